"""The README's and ``docs/*.md``'s examples cannot drift from the code.

* Every ``python -m MODULE ...`` command of every fenced ``bash`` block
  names a module that exists, only flags its parser accepts, and, where a
  value is written out, a value that flag takes (its type and choices).
  ``pipeline.run`` and ``pipeline.analyze`` are checked against the parser
  Beam builds for them (Beam's own options plus the module's options
  classes); other modules expose ``build_parser()``.
* Every options table (a table with ``flag`` and ``default`` columns) of
  the README and ``docs/*.md`` names real flags of ``pipeline.run`` with
  the parser's defaults; ``docs/options.md`` has a row for every flag.
* The README's quick start ("A real model in five minutes") runs as
  written, in a temporary directory: its ``model.convert`` commands on
  small stand-ins of the Hugging Face and Google checkpoints it names, its
  ``pipeline.run`` commands (the TF Hub handle from a pre-filled cache, no
  network) and its ``pipeline.query``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import pytest

from tests.conftest import ROOT, build_small_vocab

README = ROOT / "README.md"
DOCS = [README] + sorted((ROOT / "docs").glob("*.md"))
QUICK_START_MARKER = ("<!-- quick start: tests/test_readme_examples.py runs "
                      "these commands -->")
# The packages of this project: their command-line modules must expose
# build_parser() (or be Beam pipelines with options classes).
OUR_PACKAGES = ("pipeline", "model", "transforms", "bench", "dataflow",
                "scheduling")

_FENCE = re.compile(r"^```bash[ \t]*\n(.*?)^```", re.S | re.M)
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PYTHON = re.compile(r"(?:^|/)python(?:3(?:\.\d+)?)?$")
_OPERATORS = frozenset(";&|")
# Words that stand for a value the reader fills in.
_ELLIPSES = ("...", "…")


# --- finding the examples ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
    """One ``python -m MODULE ARGS`` command of a document."""
    where: str  # file:line
    module: str
    args: tuple[str, ...]


def strip_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` that starts a word
    outside quotes, as bash reads it (``a#b`` is no comment)."""
    quote = None
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def shell_lines(block: str) -> list[tuple[int, str]]:
    """The logical lines of a shell block, as ``(offset of its first
    line, text)``: continuation lines joined, comments and blank lines
    dropped."""
    lines: list[tuple[int, str]] = []
    current, start = "", None
    for offset, raw in enumerate(block.split("\n")):
        start = offset if start is None else start
        if raw.endswith("\\"):
            current += raw[:-1] + " "
            continue
        code = strip_comment(current + raw).strip()
        if code:
            lines.append((start, code))
        current, start = "", None
    return lines


def simple_commands(line: str) -> list[list[str]]:
    """The words of each command in ``line``, split at ``;``, ``&&``,
    ``||``, ``|`` and ``&``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word and set(word) <= _OPERATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [words for words in commands if words]


def python_call(words: list[str]) -> Optional[tuple[str, list[str]]]:
    """``(module, args)`` when ``words`` run ``[VAR=x ...] python -m
    MODULE ARGS`` (any ``python``, e.g. ``.venv/bin/python``), else None."""
    while words and _ASSIGNMENT.match(words[0]):
        words = words[1:]
    if len(words) >= 3 and _PYTHON.search(words[0]) and words[1] == "-m":
        return words[2], words[3:]
    return None


def bash_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the block's first line, its text)`` of every
    fenced ``bash`` block."""
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1))
            for match in _FENCE.finditer(text)]


def examples_in(path: Path) -> list[Example]:
    """Every ``python -m`` command in the ``bash`` blocks of ``path``."""
    found = []
    for first_line, block in bash_blocks(path.read_text(encoding="utf-8")):
        for offset, line in shell_lines(block):
            for words in simple_commands(line):
                call = python_call(words)
                if call:
                    found.append(Example(
                        f"{path.relative_to(ROOT)}:{first_line + offset}",
                        call[0], tuple(call[1])))
    return found


ALL_EXAMPLES = [example for path in DOCS for example in examples_in(path)]


# --- the parsers the examples are checked against ---------------------------


class _Captured(Exception):
    """Carries the parser a module's ``main`` built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def beam_parser(options_classes: list[type]) -> argparse.ArgumentParser:
    """The parser Beam's ``PipelineOptions`` builds for a job whose own
    options are ``options_classes``: Beam's options classes and these."""
    from apache_beam.options.pipeline_options import (PipelineOptions,
                                                      _BeamArgumentParser)
    classes: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        if cls.__module__.startswith("apache_beam."):
            classes.setdefault(str(cls), cls)
    for cls in options_classes:
        classes.setdefault(str(cls), cls)
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser


def captured_parser(module: Any) -> argparse.ArgumentParser:
    """The parser a third-party module's ``main`` builds, caught when it
    starts parsing (nothing else of ``main`` runs)."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)
    main = getattr(module, "main", None)
    assert callable(main), f"{module.__name__} has no main()"
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args",
                           capture):
        try:
            main([])
        except _Captured as caught:
            return caught.parser
    raise AssertionError(f"{module.__name__}.main([]) parsed no arguments")


def parser_of(module_name: str) -> argparse.ArgumentParser:
    """The argument parser of ``python -m module_name``."""
    from apache_beam.options.pipeline_options import PipelineOptions
    module = importlib.import_module(module_name)
    for name in ("build_parser", "build_arg_parser"):
        if callable(getattr(module, name, None)):
            return getattr(module, name)()
    ours = [value for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, PipelineOptions)
            and value.__module__.split(".")[0] in OUR_PACKAGES]
    if ours:
        return beam_parser(ours)
    if module_name.split(".")[0] in OUR_PACKAGES:
        raise AssertionError(
            f"{module_name} has no build_parser(): give it one, so that "
            "the documents' examples of it can be checked")
    return captured_parser(module)


# --- checking a command ----------------------------------------------------


def is_placeholder(value: str) -> bool:
    """Whether ``value`` stands for something the reader fills in
    (``...``, ``$VAR``, ``N``, ``MODEL_DIR``) rather than a literal."""
    return (any(e in value for e in _ELLIPSES) or "$" in value
            or "<" in value or re.fullmatch(r"[A-Z][A-Z0-9_]*", value)
            is not None)


def _value_problem(flag: str, action: argparse.Action,
                   value: str) -> Optional[str]:
    """Why ``value`` is not a value ``flag`` takes, or None."""
    if is_placeholder(value):
        return None
    converted: Any = value
    if callable(action.type):
        try:
            converted = action.type(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            return f"{flag} does not take {value!r} ({err})"
    if action.choices is not None and converted not in action.choices:
        return (f"{flag} {value!r} is not one of "
                f"{', '.join(map(str, action.choices))}")
    return None


def check_example(module: str, args: tuple[str, ...],
                  parser: argparse.ArgumentParser) -> list[str]:
    """What is wrong with ``python -m module args`` for ``parser``: flags
    it does not define (no abbreviations), flags without their value,
    literal values of the wrong type or not among the choices, stray
    words.  Optional parts written ``[--flag VALUE]`` count as given."""
    # pylint: disable-next=protected-access
    every = list(parser._actions)
    actions = {flag: action for action in every
               for flag in action.option_strings}
    positionals = any(not action.option_strings for action in every)
    words = [word.strip("[]") for word in args]
    problems: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word in _ELLIPSES or not word:
            continue
        if not word.startswith("-"):
            if not positionals:
                problems.append(f"stray argument {word!r}")
            continue
        flag, has_value, value = word.partition("=")
        action = actions.get(flag)
        if action is None:
            problems.append(f"no flag {flag}")
            continue
        if action.nargs == 0:
            if has_value:
                problems.append(f"{flag} takes no value")
            continue
        if not has_value:
            if index >= len(words) or words[index].startswith("--"):
                problems.append(f"{flag} needs a value")
                continue
            value = words[index]
            index += 1
        problem = _value_problem(flag, action, value)
        if problem:
            problems.append(problem)
    return [f"{module}: {problem}" for problem in problems]


def module_problem(module: str) -> Optional[str]:
    """Why ``python -m module`` cannot run, or None."""
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        found = None
    return None if found is not None else f"no module {module}"


# --- the options tables -----------------------------------------------------

OPTIONS_DOC = ROOT / "docs" / "options.md"
_TABLE_ROW = re.compile(r"^\|.*\|[ \t]*$")


def _cells(line: str) -> list[str]:
    """The cells of a table row, stripped."""
    return [cell.strip() for cell in line.strip().strip("|").split(" | ")]


def options_rows(text: str) -> list[tuple[int, list[str], str]]:
    """``(line, flags, default cell)`` of each flag row of every options
    table in ``text``: a table whose header's first cell is ``flag`` and
    which has a ``default`` column."""
    rows = []
    lines = text.split("\n")
    default_column = None
    for number, line in enumerate(lines, start=1):
        if not _TABLE_ROW.match(line):
            default_column = None
            continue
        cells = _cells(line)
        previous = lines[number - 2] if number > 1 else ""
        if not _TABLE_ROW.match(previous):  # a header row
            names = [cell.lower() for cell in cells]
            default_column = (names.index("default")
                              if names[0] == "flag" and "default" in names
                              else None)
            continue
        if default_column is None or not cells[0].startswith("`--"):
            continue
        flags = re.findall(r"`(--[\w-]+)`", cells[0])
        rows.append((number, flags, cells[default_column]))
    return rows

def split_defaults(cell: str) -> list[str]:
    """A default cell's parts, one per flag of the row: split at commas
    followed by a space outside backticks and parentheses (``1,000,000``
    is one number)."""
    parts, current, depth, code = [], "", 0, False
    for index, char in enumerate(cell):
        if char == "`":
            code = not code
        elif char == "(" and not code:
            depth += 1
        elif char == ")" and not code:
            depth -= 1
        elif (char == "," and not code and depth == 0
              and cell[index + 1:index + 2] == " "):
            parts.append(current.strip())
            current = ""
            continue
        current += char
    return parts + [current.strip()]


def default_matches(stated: str, default: Any) -> bool:
    """Whether a table's ``stated`` default is the parser's ``default``.

    `` `x` `` is the literal value (a list joined with commas); a number
    is a number (``1,000,000`` = 1000000, ``60`` = 60.0, ``99%`` = 0.99);
    ``off``/``on``
    are a switch's False/True; other words (``required``, ``none``, ``demo
    model``, ``from the model``, ``cached``) say there is no default value:
    None.  A remark in parentheses after it is ignored.
    """
    code = re.fullmatch(r"`([^`]*)`", stated)
    if code:
        value = code.group(1)
        if isinstance(default, (list, tuple)):
            return ",".join(map(str, default)) == value
        return default is not None and str(default) == value
    head = re.split(r"\s+\(", stated, maxsplit=1)[0].strip()
    number = head.replace(",", "")
    scale = 1.0
    if number.endswith("%"):
        number, scale = number[:-1], 0.01
    if re.fullmatch(r"-?\d+(\.\d+)?", number):
        return (isinstance(default, (int, float))
                and not isinstance(default, bool)
                and abs(float(default) - float(number) * scale) < 1e-9)
    if head == "off":
        return default is False
    if head == "on":
        return default is True
    return default is None and "`" not in head


def table_problems(text: str, where: str = "docs/options.md",
                   complete: bool = True) -> list[str]:
    """What the options tables of ``text`` (the page ``where``) state that
    the job's parser does not; with ``complete``, also every flag of the
    job that has no row."""
    from pipeline.options import EmbedOptions, embed_flags
    parser = beam_parser([EmbedOptions])
    # pylint: disable-next=protected-access
    actions = {flag: action for action in parser._actions
               for flag in action.option_strings}
    ours = {f"--{name}" for name in embed_flags()}
    problems, documented = [], set()
    for line, flags, cell in options_rows(text):
        parts = split_defaults(cell)
        if len(parts) not in (1, len(flags)):
            problems.append(f"{where}:{line}: {len(flags)} flags but "
                            f"{len(parts)} defaults in {cell!r}")
            continue
        for flag, stated in zip(flags, parts * len(flags)
                                if len(parts) == 1 else parts):
            documented.add(flag)
            if flag not in ours:
                problems.append(f"{where}:{line}: {flag} is not a flag of "
                                "pipeline.run")
            elif not default_matches(stated, actions[flag].default):
                problems.append(
                    f"{where}:{line}: {flag} is said to default to "
                    f"{stated!r}, the parser's default is "
                    f"{actions[flag].default!r}")
    if complete:
        problems += [f"{where}: the options table has no row for {flag}"
                     for flag in sorted(ours - documented)]
    return problems


# --- the tests: examples and table -----------------------------------------


def test_the_documents_examples_are_found():
    """The parsing finds what the documents hold (a broken parser must not
    pass by finding nothing)."""
    modules = {example.module for example in ALL_EXAMPLES}
    assert {"pipeline.run", "pipeline.analyze", "pipeline.query",
            "pipeline.compact", "model.convert",
            "apache_beam.runners.worker.worker_pool_main"} <= modules
    assert len([e for e in ALL_EXAMPLES
                if e.where.startswith("README.md")]) >= 5
    assert len(ALL_EXAMPLES) >= 15
    for page in ("docs/models.md", "docs/runners.md", "docs/dataflow.md",
                 "docs/performance.md", "docs/incremental.md"):
        assert any(e.where.startswith(page + ":") for e in ALL_EXAMPLES), page
    # Continuation lines are joined: the Dataflow example's last flag.
    assert any("--outputs" in e.args and "--setup_file" in e.args
               for e in ALL_EXAMPLES)


@pytest.mark.parametrize("example", ALL_EXAMPLES,
                         ids=[f"{e.where}-{e.module}" for e in ALL_EXAMPLES])
def test_every_command_takes_its_flags(example):
    problem = module_problem(example.module)
    assert problem is None, f"{example.where}: {problem}"
    problems = check_example(example.module, example.args,
                             parser_of(example.module))
    assert not problems, f"{example.where}: " + "; ".join(problems)


def test_docs_options_has_a_row_for_every_flag_with_its_default():
    """docs/options.md is the full table: every flag of pipeline.run, each
    with the parser's default."""
    problems = table_problems(OPTIONS_DOC.read_text(encoding="utf-8"))
    assert options_rows(OPTIONS_DOC.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [p for p in DOCS if p != OPTIONS_DOC],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_other_options_table_states_the_parsers_defaults(path):
    """Shorter tables (the README's main options) need not name every flag,
    but what they state must be true."""
    problems = table_problems(path.read_text(encoding="utf-8"),
                              str(path.relative_to(ROOT)), complete=False)
    assert not problems, "\n".join(problems)


def test_the_readme_has_a_main_options_table():
    assert len(options_rows(README.read_text(encoding="utf-8"))) >= 10


def test_the_checks_catch_drift():
    """Each kind of drift the checks exist for is reported."""
    run = parser_of("pipeline.run")
    problems = check_example("pipeline.run", (
        "--input", "a.jsonl", "--max_seq_lenght", "64", "--pooling", "max",
        "--batch_size", "many", "--normalize=yes", "stray", "--output"),
        run)
    assert problems == [f"pipeline.run: {problem}" for problem in [
        "no flag --max_seq_lenght",
        "stray argument '64'",
        "--pooling 'max' is not one of cls, mean, first_last_avg",
        "--batch_size does not take 'many' (invalid literal for int() with "
        "base 10: 'many')",
        "--normalize takes no value",
        "stray argument 'stray'",
        "--output needs a value"]]
    # Beam's own flags pass, placeholders are not checked, brackets mark
    # optional parts; another module's flag is refused.
    assert check_example("pipeline.run", (
        "--runner", "DataflowRunner", "...", "--max_seq_length", "N",
        "[--format", "tfrecord]", "--model", "$MODEL"), run) == []
    assert check_example("pipeline.run", ("--top_k", "3"), run) == [
        "pipeline.run: no flag --top_k", "pipeline.run: stray argument '3'"]
    assert check_example("pipeline.compact", (
        "--index", "x", "--parquet_compression", "lz4"),
        parser_of("pipeline.compact"))[0].startswith(
            "pipeline.compact: --parquet_compression 'lz4' is not one of")
    assert module_problem("pipeline.rnu") == "no module pipeline.rnu"
    assert module_problem("pipeline.run") is None
    # The full table: another default, a flag that does not exist, a
    # missing row.
    text = OPTIONS_DOC.read_text(encoding="utf-8")
    assert table_problems(text) == []
    drifted = (text.replace("| `--batch_size` | 32 |",
                            "| `--batch_size` | 64 |")
               .replace("| `--pooling` | `cls` |", "| `--pooling` | `mean` |")
               .replace("| `--dedup` | off |", "| `--dedupe` | off |"))
    assert sorted(table_problems(drifted)) == sorted([
        f"docs/options.md:{_row_line(drifted, '--dedupe')}: --dedupe is not "
        "a flag of pipeline.run",
        f"docs/options.md:{_row_line(drifted, '--pooling')}: --pooling is "
        "said to default to '`mean`', the parser's default is 'cls'",
        f"docs/options.md:{_row_line(drifted, '--batch_size')}: "
        "--batch_size is said to default to '64', the parser's default is 32",
        "docs/options.md: the options table has no row for --dedup"])
    # The README's short table: a wrong default is reported, a flag it
    # leaves out is not.
    readme = README.read_text(encoding="utf-8")
    assert table_problems(readme, "README.md", complete=False) == []
    wrong = readme.replace("| `--max_tokens_per_batch` | 2048 |",
                           "| `--max_tokens_per_batch` | 4,096 |")
    assert table_problems(wrong, "README.md", complete=False) == [
        f"README.md:{_row_line(wrong, '--max_tokens_per_batch')}: "
        "--max_tokens_per_batch is said to default to '4,096', the parser's "
        "default is 2048"]
    # Only tables with a flag and a default column are options tables.
    assert options_rows("| `--pooling` | vector |\n|---|---|\n"
                        "| `--x` | y |\n") == []


def _row_line(text: str, flag: str) -> int:
    (line,) = [line for line, flags, _ in options_rows(text) if flag in flags]
    return line


@pytest.mark.parametrize("stated, default, matches", [
    ("`auto`", "auto", True), ("`none`", "none", True),
    ("`none`", None, False),
    ("1,000,000", 1000000, True), ("1,000,000", 100000, False),
    ("60", 60.0, True), ("0 (runner decides)", 0, True), ("off", False, True),
    ("off", None, False), ("none (sort only)", None, True),
    ("required", None, True), ("demo model", None, True),
    ("`pooled,sequence`", ["pooled", "sequence"], True),
    ("`pooled`", ["pooled", "sequence"], False), ("32", True, False),
    ("99%", 0.99, True), ("99%", 0.9, False), ("0.99", 0.99, True),
])
def test_how_table_defaults_are_read(stated, default, matches):
    assert default_matches(stated, default) is matches


def test_shell_lines_and_comments():
    block = ("# a comment\n"
             ".venv/bin/python -m pipeline.run --input 'a #1' \\\n"
             "  --output out/x  # trailing\n"
             "\n"
             "PATH=\"$PWD/.venv/bin:$PATH\" python3 -m m.n --f 1 & echo a#b\n")
    lines = shell_lines(block)
    assert [(offset, " ".join(text.split())) for offset, text in lines] == [
        (1, ".venv/bin/python -m pipeline.run --input 'a #1' --output out/x"),
        (4, "PATH=\"$PWD/.venv/bin:$PATH\" python3 -m m.n --f 1 & echo a#b")]
    calls = [python_call(words) for _, line in lines
             for words in simple_commands(line)]
    assert calls == [
        ("pipeline.run", ["--input", "a #1", "--output", "out/x"]),
        ("m.n", ["--f", "1"]), None]


# --- the quick start, run ----------------------------------------------------

# The checkpoints the quick start converts, and what they stand for.
HF_SOURCE = "bert-base-chinese"
GOOGLE_SOURCE = "chinese_L-12_H-768_A-12"
QUERY_DOC_ID = "quick-start-query"


def quick_start_lines() -> list[str]:
    """The commands of the README's quick-start block, one per logical
    line."""
    text = README.read_text(encoding="utf-8")
    assert text.count(QUICK_START_MARKER) == 1
    after = text.split(QUICK_START_MARKER, 1)[1].lstrip("\n")
    assert after.startswith("```bash\n")
    block = after[len("```bash\n"):].split("```", 1)[0]
    return [line for _, line in shell_lines(block)]


def flag_value(args: list[str], flag: str) -> Optional[str]:
    """The value given to ``flag`` in ``args`` (last one wins)."""
    value = None
    for index, word in enumerate(args):
        if word == flag and index + 1 < len(args):
            value = args[index + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def _write_stand_ins(root: Path, texts: list[str], random_bert_weights
                     ) -> None:
    """Tiny checkpoints in the two layouts, with one set of weights and a
    vocabulary of the texts' characters: a Hugging Face folder
    (config.json, vocab.txt, model.safetensors, and tokenizer_config.json
    saying do_lower_case false, as bert-base-chinese's does) and Google's
    release layout (bert_config.json, bert_model.ckpt.*, vocab.txt)."""
    from model.bert import BertConfig
    from tests.test_model_convert import (
        config_dicts, google_to_hf, write_google_checkpoint, write_hf_folder,
        write_safetensors)
    vocab = build_small_vocab(texts)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_layers=2,
                        num_heads=4, intermediate_size=64,
                        max_position_embeddings=128)
    google_config, hf_config = config_dicts(config)
    weights = random_bert_weights(config, seed=21)
    tensors = google_to_hf(weights, num_layers=config.num_layers)
    write_hf_folder(root / HF_SOURCE,
                    lambda folder: write_safetensors(
                        folder / "model.safetensors", tensors),
                    tokenizer_config={"do_lower_case": False},
                    config=hf_config, vocab=vocab)
    write_google_checkpoint(root / GOOGLE_SOURCE, weights,
                            config=google_config, vocab=vocab)


def _sample_corpus(path: Path, query_text: str) -> list[str]:
    """``data/sample_zh.jsonl`` for the commands: the bundled sample's
    first documents and one whose text is the README's query."""
    with open(ROOT / "data" / "sample_zh.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle][:8]
    records.append({"id": QUERY_DOC_ID, "text": query_text})
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                            for r in records), encoding="utf-8")
    return [r["text"] for r in records]


def _prefill_tf_hub_cache(cache: Path, handle: str, model_dir: Path) -> None:
    """What ``tensorflow_hub`` would have downloaded for ``handle``: the
    model under the SHA-1 of the handle in ``$TFHUB_CACHE_DIR``."""
    target = cache / hashlib.sha1(handle.encode("utf-8")).hexdigest()
    if not target.exists():
        shutil.copytree(model_dir, target)


def _converted_models_agree(first: Path, second: Path) -> None:
    """The two releases hold the same weights: so do their conversions."""
    import numpy as np
    from model.load import load_bert_saved_model
    from model.vocab import read_tokenizer_settings
    ids = np.array([[101, 104, 110, 105, 102, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    a = load_bert_saved_model(str(first))(ids, mask, np.zeros_like(ids))
    b = load_bert_saved_model(str(second))(ids, mask, np.zeros_like(ids))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5)
    # An uncased vocabulary: lower-casing, whatever tokenizer_config says.
    assert read_tokenizer_settings(str(first)).do_lower_case is True
    assert read_tokenizer_settings(str(second)).do_lower_case is True


# The order the quick start's commands can run in: every conversion first,
# then the runs (each writes its own output), then the queries of their
# outputs.  Commands of one stage do not depend on each other and run side
# by side.
STAGES = ("model.convert", "pipeline.run", "pipeline.query")


def _run_stage(lines: list[str], cwd: Path, env: dict[str, str]
               ) -> list[subprocess.CompletedProcess]:
    """``lines`` run side by side through bash; their results in order."""
    from concurrent.futures import ThreadPoolExecutor

    def run(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
    with ThreadPoolExecutor(max_workers=max(1, len(lines))) as pool:
        results = list(pool.map(run, lines))
    for line, done in zip(lines, results):
        assert done.returncode == 0, (
            f"{line}\nexit {done.returncode}\n{done.stderr[-3000:]}")
    return results


@pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "python").exists(),
                    reason="needs a virtual environment with bin/python "
                           "(the commands run .venv/bin/python)")
def test_the_quick_start_runs_as_written(tmp_path, random_bert_weights):
    """Each command of the quick start, as written, through bash in a
    temporary directory whose ``.venv`` is this interpreter's environment,
    after its inputs were put there: the checkpoints it converts (tiny
    stand-ins), ``data/sample_zh.jsonl`` and, for a TF Hub handle, a
    pre-filled cache.  Then what each printed or wrote is checked."""
    from model.handles import is_hub_handle
    lines = quick_start_lines()
    calls = []
    for line in lines:
        commands = simple_commands(line)
        assert len(commands) == 1, f"one command per line: {line}"
        call = python_call(commands[0])
        assert call and call[0] in STAGES, (
            f"the quick start runs python -m {', '.join(STAGES)}; teach "
            f"this test to run {line}")
        calls.append((line,) + call)
    stages = {stage: [(line, args) for line, module, args in calls
                      if module == stage] for stage in STAGES}
    assert all(stages.values()), f"each of {STAGES} is in the quick start"
    sources = {flag_value(args, "--source")
               for _, args in stages["model.convert"]}
    assert sources == {HF_SOURCE, GOOGLE_SOURCE}, (
        f"the quick start converts {sources}: teach this test what they "
        "stand for")
    (query,) = stages["pipeline.query"]
    query_text = flag_value(query[1], "--text")

    texts = _sample_corpus(tmp_path / "data" / "sample_zh.jsonl", query_text)
    _write_stand_ins(tmp_path, texts, random_bert_weights)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    hub_cache = tmp_path / "tfhub_modules"
    env = dict(os.environ, TFHUB_CACHE_DIR=str(hub_cache),
               PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")]
                                  if p]))

    # Conversions: each prints the model's directory and writes it.
    converts = stages["model.convert"]
    converted = []
    for (line, args), done in zip(converts, _run_stage(
            [line for line, _ in converts], tmp_path, env)):
        output = tmp_path / flag_value(args, "--output")
        printed = Path(done.stdout.strip().splitlines()[-1])
        assert printed.resolve() == output.resolve()
        assert (output / "saved_model.pb").is_file()
        converted.append(output)
    _converted_models_agree(*converted)

    # Runs: a TF Hub handle comes from the cache, as tensorflow_hub would
    # have left it (no network here).
    runs, skipped = [], []
    for line, args in stages["pipeline.run"]:
        model = flag_value(args, "--model")
        if is_hub_handle(model):
            if importlib.util.find_spec("tensorflow_hub") is None:
                skipped.append(line)
                continue
            _prefill_tf_hub_cache(hub_cache, model, converted[0])
        runs.append((line, args))
    prefixes = [flag_value(args, "--output") for _, args in runs]
    assert len(set(prefixes)) == len(prefixes), "each run its own output"
    for (line, args), done in zip(runs, _run_stage(
            [line for line, _ in runs], tmp_path, env)):
        manifest = json.loads((tmp_path / f"{flag_value(args, '--output')}"
                               "-manifest.json").read_text(encoding="utf-8"))
        assert manifest["status"] == "succeeded"
        assert manifest["counts"]["documents_embedded"] == len(texts)
        assert manifest["options"]["model_dir"] == flag_value(args, "--model")
        # The model ran on the engine chosen for it, not as a fallback.
        assert "falling back" not in done.stderr, done.stderr[-2000:]

    # The query finds the document that is its text, best first.
    (done,) = _run_stage([query[0]], tmp_path, env)
    assert flag_value(query[1], "--index") in prefixes
    hits = [hit.split("\t") for hit in done.stdout.splitlines()]
    assert len(hits) == int(flag_value(query[1], "--top_k") or 10)
    score, top_id, text = hits[0]
    assert top_id == QUERY_DOC_ID and text == query_text
    assert float(score) > 0.999
    assert [float(h[0]) for h in hits] == sorted(
        (float(h[0]) for h in hits), reverse=True)
    if skipped:
        pytest.skip("tensorflow_hub is not installed; every command ran but "
                    + "; ".join(skipped))
