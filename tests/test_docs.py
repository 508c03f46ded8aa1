"""The README stays short and the documents stay true and connected.

* README.md has at most ``README_MAX_LINES`` lines: the details live in
  ``docs/*.md``.
* Every relative link of README.md and ``docs/*.md`` names a file that
  exists, and a ``#fragment`` names a heading of that page (as GitHub
  makes anchors from headings).
* A default stated in prose, ```--flag` ... default N`` (or a backticked
  value), is the default of that flag in a parser of the documented
  commands.

The commands in ``bash`` blocks and the options tables are checked by
``tests/test_readme_examples.py``, for the same pages.
"""

from __future__ import annotations

import re
from pathlib import Path
import pytest

from tests.conftest import ROOT
from tests.test_readme_examples import (DOCS, README, default_matches,
                                        parser_of)

README_MAX_LINES = 200
# The command-line modules whose flags the documents state defaults of.
DOCUMENTED_MODULES = ("pipeline.run", "pipeline.analyze", "pipeline.query",
                      "pipeline.compact", "model.convert", "model.quantize")

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
_LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...
# `--flag`, then at most 80 characters without a backtick, then
# "default" and a value: a backticked literal or a number (1,000 / 0.99 /
# 99%).
_STATED_DEFAULT = re.compile(
    r"`(--[A-Za-z0-9_-]+)`(?P<between>[^`]{0,80}?)\bdefault:?\s+"
    r"(?P<value>`[^`]*`|-?\d+(?:,\d{3})*(?:\.\d+)?%?)")


def prose(text: str) -> str:
    """``text`` with its fenced code blocks blanked (line numbers kept)."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other
    than ``-`` and ``_`` dropped, spaces as ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings (``-1``, ``-2`` for repeats)."""
    found: set[str] = set()
    for match in _HEADING.finditer(prose(path.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        name, count = base, 0
        while name in found:
            count += 1
            name = f"{base}-{count}"
        found.add(name)
    return found


def link_problems(path: Path) -> list[str]:
    """Relative links of ``path`` to a missing file or heading."""
    text = prose(path.read_text(encoding="utf-8"))
    where = path.relative_to(ROOT)
    problems = []
    for match in _LINK.finditer(text):
        target = match.group(1)
        if _EXTERNAL.match(target):
            continue
        line = text.count("\n", 0, match.start()) + 1
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{where}:{line}: {target}: no file {file_part}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(
                linked):
            problems.append(f"{where}:{line}: {target}: no heading "
                            f"#{fragment} in {linked.relative_to(ROOT)}")
    return problems


def stated_defaults(text: str) -> list[tuple[int, str, str]]:
    """``(line, flag, value)`` of each ```--flag` ... default VALUE`` in
    the prose of ``text``."""
    body = prose(text)
    return [(body.count("\n", 0, match.start()) + 1, match.group(1),
             match.group("value"))
            for match in _STATED_DEFAULT.finditer(body)]


def _defaults_by_flag() -> dict[str, list[tuple[str, object]]]:
    """``flag -> [(module, default), ...]`` over the documented modules."""
    table: dict[str, list[tuple[str, object]]] = {}
    for module in DOCUMENTED_MODULES:
        # pylint: disable-next=protected-access
        for action in parser_of(module)._actions:
            for flag in action.option_strings:
                table.setdefault(flag, []).append((module, action.default))
    return table


def default_problems(text: str, where: str,
                     defaults: dict[str, list[tuple[str, object]]]
                     ) -> list[str]:
    """Stated defaults of ``text`` that no documented module has."""
    problems = []
    for line, flag, value in stated_defaults(text):
        options = defaults.get(flag)
        if not options:
            problems.append(f"{where}:{line}: {flag} is not a flag of "
                            f"{', '.join(DOCUMENTED_MODULES)}")
        elif not any(default_matches(value, default)
                     for _, default in options):
            problems.append(
                f"{where}:{line}: {flag} is said to default to {value}, "
                "the parser's default is " + ", ".join(
                    f"{default!r} ({module})" for module, default in options))
    return problems


@pytest.fixture(scope="module")
def defaults() -> dict[str, list[tuple[str, object]]]:
    return _defaults_by_flag()


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- the tests ---------------------------------------------------------------


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
        "move details into docs/")


def test_the_readme_points_to_the_docs():
    """The README links the full options table, and every docs page it
    links exists (the link check below says which does not)."""
    text = README.read_text(encoding="utf-8")
    assert "(docs/options.md)" in text
    assert len({m.group(1).partition("#")[0] for m in _LINK.finditer(text)
                if m.group(1).startswith("docs/")}) >= 10


@pytest.mark.parametrize("path", DOCS, ids=_page_id)
def test_every_relative_link_resolves(path):
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=_page_id)
def test_every_stated_default_is_the_parsers(path, defaults):
    problems = default_problems(path.read_text(encoding="utf-8"),
                                _page_id(path), defaults)
    assert not problems, "\n".join(problems)


def test_stated_defaults_are_found(defaults):
    """The pages state defaults in prose, and the checks find them."""
    found = {flag for path in DOCS
             for _, flag, _ in stated_defaults(
                 path.read_text(encoding="utf-8"))}
    assert {"--max_tokens_per_batch", "--progress_interval",
            "--length_coverage", "--top_k"} <= found


def test_the_checks_catch_drift(defaults, tmp_path, monkeypatch):
    """A wrong stated default, a missing page and a missing heading are
    each reported; links outside the repository are not followed."""
    text = ("The budget, `--max_tokens_per_batch` padded tokens (default "
            "4,096), and `--progress_interval` seconds (default 60;\n"
            "0 is off); `--top_k` hits (default `10`); `--length_coverage`, "
            "default 99%; `--no_such_flag` (default 3).\n"
            "```bash\n# `--batch_size` (default 7) in code is not prose\n"
            "```\n")
    assert stated_defaults(text) == [
        (1, "--max_tokens_per_batch", "4,096"),
        (1, "--progress_interval", "60"), (2, "--top_k", "`10`"),
        (2, "--length_coverage", "99%"), (2, "--no_such_flag", "3")]
    problems = default_problems(text, "x.md", defaults)
    assert problems[0].startswith(
        "x.md:1: --max_tokens_per_batch is said to default to 4,096, the "
        "parser's default is 2048 (pipeline.run)")
    assert problems[1:] == [
        "x.md:2: --no_such_flag is not a flag of "
        + ", ".join(DOCUMENTED_MODULES)]

    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A page\n\n## Sentence vectors: `--pooling`, `--normalize`\n",
        encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#a-page) "
        "[ok](docs/a.md#sentence-vectors---pooling---normalize)\n"
        "[gone](docs/b.md) [no heading](docs/a.md#b-page) "
        "[here](#top) [web](https://example.com/x.md)\n"
        "# Top\n```\n[in code](nowhere.md)\n```\n", encoding="utf-8")
    assert link_problems(page) == [
        "README.md:2: docs/b.md: no file docs/b.md",
        "README.md:2: docs/a.md#b-page: no heading #b-page in docs/a.md"]


@pytest.mark.parametrize("heading, anchor", [
    ("A real model in five minutes", "a-real-model-in-five-minutes"),
    ("Sentence vectors: `--pooling`, `--normalize`",
     "sentence-vectors---pooling---normalize"),
    ("One dataset for any reader: `pipeline.compact`",
     "one-dataset-for-any-reader-pipelinecompact"),
    ("Fine-tuning (model card)", "fine-tuning-model-card"),
    ("中文 标题", "中文-标题"),
])
def test_anchors_are_githubs(heading, anchor):
    assert slug(heading) == anchor

