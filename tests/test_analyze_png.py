"""``pipeline.analyze`` draws the token-length histogram: a valid, non-blank
PNG whose bars are the corpus' exact lengths and whose lines mark the
``--max_seq_length`` cut and the recommended buckets; without matplotlib
one line and the JSON still.  And the analyze commands of
docs/performance.md run as written."""

from __future__ import annotations

import json
import logging
import random
import re
import shlex
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from model import native_log
from pipeline import analyze
from pipeline import run as run_module
from tests.conftest import ROOT

MAX_SEQ_LENGTH = 64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory, small_vocab) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(small_vocab) + "\n", encoding="utf-8")
    return path


def _lengths_corpus(path: Path) -> np.ndarray:
    """Documents of CJK characters, one token each: ``n`` characters are
    ``n + 2`` tokens.  Lengths spread over many bins, one over 512, one
    exactly on a bin edge and one on ``MAX_SEQ_LENGTH``; two empty lines."""
    rng = random.Random(11)
    alphabet = "今天天气很好我们去公园散步这家酒店的服务非常房间干净"
    counts = [rng.randint(1, 120) for _ in range(150)] + [600, 14,
                                                         MAX_SEQ_LENGTH - 2]
    lines = ["".join(rng.choice(alphabet) for _ in range(n)) for n in counts]
    path.write_text("\n".join(lines + ["", "  "]) + "\n", encoding="utf-8")
    return np.array(counts) + 2


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, vocab_file):
    folder = tmp_path_factory.mktemp("plot")
    lengths = _lengths_corpus(folder / "corpus.txt")
    report = analyze.run([
        "--input", str(folder / "corpus.txt"), "--vocab_file",
        str(vocab_file), "--max_seq_length", str(MAX_SEQ_LENGTH),
        "--output", str(folder / "analysis.json")])
    return report, folder, lengths


def test_the_histogram_holds_the_exact_lengths(analysed):
    report, folder, lengths = analysed
    hist = report["token_length_histogram"]
    edges = np.array(hist["bin_edges"])
    assert edges[0] == 0 and edges[-1] == analyze.HISTOGRAM_MAX
    assert np.all(np.diff(edges) == analyze.HISTOGRAM_STEP)
    expected = [int(np.sum((lengths > lo) & (lengths <= hi)))
                for lo, hi in zip(edges, edges[1:])]
    assert hist["counts"] == expected
    assert hist["longer"] == int(np.sum(lengths > edges[-1])) == 1
    assert sum(hist["counts"]) + hist["longer"] == \
        report["documents"] - report["empty_documents"]
    written = json.loads((folder / "analysis.json").read_text("utf-8"))
    assert written["token_length_histogram"] == hist


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def test_a_png_is_written_next_to_the_json(analysed):
    import matplotlib.image
    _, folder, _ = analysed
    png = folder / "analysis.png"
    data = png.read_bytes()
    assert _png_size(data) == (900, 480)
    pixels = matplotlib.image.imread(str(png))
    assert pixels.shape[:2] == (480, 900)
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05  # not blank
    # White background, blue bars, red cut line, green boundaries at least.
    assert len(np.unique(np.round(rgb.reshape(-1, 3), 2), axis=0)) > 10


def test_the_cut_and_the_recommended_buckets_are_marked(analysed):
    report, _, lengths = analysed
    figure = analyze.length_figure(report)
    (axes,) = figure.axes
    vertical = {}
    for line in axes.get_lines():
        xs = set(np.ravel(line.get_xdata()))
        if len(xs) == 1:
            vertical.setdefault(float(xs.pop()), []).append(line)
    assert MAX_SEQ_LENGTH in vertical
    boundaries = report["recommended_bucket_boundaries"]
    assert boundaries and set(boundaries) <= set(vertical)
    assert report["recommended_max_seq_length"] in vertical
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    truncated = np.mean(lengths > MAX_SEQ_LENGTH)
    assert f"--max_seq_length {MAX_SEQ_LENGTH}: {truncated:.1%} truncated" \
        in labels
    assert "recommended bucket boundaries " + ",".join(
        map(str, boundaries)) in labels
    # The bars are the histogram's counts, and the overflow bar.
    heights = [patch.get_height() for patch in axes.patches]
    hist = report["token_length_histogram"]
    assert heights == hist["counts"] + [hist["longer"]]


def test_plot_none_or_a_path_of_its_own(tmp_path, vocab_file):
    corpus = tmp_path / "c.txt"
    _lengths_corpus(corpus)
    common = ["--input", str(corpus), "--vocab_file", str(vocab_file)]
    analyze.run(common + ["--output", str(tmp_path / "a.json"),
                          "--plot", "none"])
    assert (tmp_path / "a.json").exists()
    assert not list(tmp_path.glob("*.png"))
    analyze.run(common + ["--plot", str(tmp_path / "lengths.png")])
    assert _png_size((tmp_path / "lengths.png").read_bytes()) == (900, 480)
    assert analyze.plot_path("auto", "gs://b/r.json") == "gs://b/r.png"
    assert analyze.plot_path("auto", "out/report") == "out/report.png"
    assert analyze.plot_path("auto", None) is None


def test_without_matplotlib_one_line_and_the_json(tmp_path, vocab_file,
                                                  monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    corpus = tmp_path / "c.txt"
    _lengths_corpus(corpus)
    report = analyze.run(["--input", str(corpus), "--vocab_file",
                          str(vocab_file), "--output",
                          str(tmp_path / "r.json")])
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert err == ["plot skipped: it needs matplotlib (pip install "
                   "'bert-zh-embed[plots]')"]
    assert json.loads((tmp_path / "r.json").read_text("utf-8")) == report
    assert not (tmp_path / "r.png").exists()


# --- the analyze commands of docs/performance.md ----------------------------


def _doc_commands(page: str, heading: str) -> list[list[str]]:
    """The commands of the first bash block under ``heading`` in
    ``page``."""
    text = (ROOT / page).read_text(encoding="utf-8")
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines()
            if line.strip() and not line.startswith("#")]


def _run_local_args() -> list[str]:
    """What ``./run_local.sh`` passes to ``pipeline.run`` before ``$@``."""
    script = (ROOT / "run_local.sh").read_text(encoding="utf-8")
    call = script[script.index("exec .venv/bin/python -m pipeline.run"):]
    words = shlex.split(call.replace("\\\n", " "))
    return words[words.index("pipeline.run") + 1:words.index("$@")]


def test_the_readme_quick_start_runs(tmp_path, monkeypatch, capsys,
                                     request):
    """The analyze paragraph's commands, as written (``.venv/bin/python -m
    X`` as this interpreter's ``X.main``, ``./run_local.sh`` as what it
    runs), with ``out/`` in a temporary directory."""
    # What main() sets up for its console is undone afterwards.
    monkeypatch.setenv(native_log.QUIET_ENV, "0")
    request.addfinalizer(lambda: logging.captureWarnings(False))
    monkeypatch.chdir(ROOT)

    def local(arg: str) -> str:
        return str(tmp_path / arg) if arg.startswith("out/") else arg

    commands = _doc_commands("docs/performance.md",
                            "## Know your corpus first")
    kinds = []
    for words in commands:
        if words[:3] == [".venv/bin/python", "-m", "pipeline.analyze"]:
            code = analyze.main([local(w) for w in words[3:]])
            kinds.append("analyze")
        elif words[0] == "./run_local.sh":
            code = run_module.main(
                [local(w) for w in _run_local_args() + words[1:]])
            kinds.append("run")
        else:
            pytest.fail(f"unexpected command in docs/performance.md: {words}")
        assert code == 0, (words, capsys.readouterr().err[-2000:])
    assert kinds == ["analyze", "run", "run"]
    assert "--analysis" in commands[1] and "--bucket_boundaries" in commands[2]
    report = json.loads((tmp_path / "out/sample/analysis.json").read_text(
        encoding="utf-8"))
    assert report["recommended_bucket_boundaries"]
    assert _png_size((tmp_path / "out/sample/analysis.png").read_bytes())
