"""Helpers that several commands and modules used to carry their own copy
of, now one each: the share parsers of ``--max_error_rate`` and
``--length_coverage``, the argparse that raises ``UsageError``, path
joining, the vocabulary reader, and console logging."""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import pathlib
import re

import pytest

from model import console
from model.handles import join_path
from model.vocab import load_vocab
from pipeline.cli import UsageError, UsageParser
from pipeline.options import _positive_share, _share

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("parse,accepted,refused,interval", [
    (_share, ["0", "0.5", "1"], ["-0.1", "1.01", "nan"], "[0, 1]"),
    (_positive_share, ["0.01", "1"], ["0", "-1", "1.5", "nan"], "(0, 1]"),
])
def test_share_parsers(parse, accepted, refused, interval):
    for value in accepted:
        assert parse(value) == float(value)
    for value in refused:
        with pytest.raises(argparse.ArgumentTypeError,
                           match=re.escape(f"must be in {interval}, got "
                                           f"{value}")):
            parse(value)


@pytest.mark.parametrize("flag,parse", [("--max_error_rate", _share),
                                        ("--length_coverage",
                                         _positive_share)])
def test_share_parsers_in_argparse_keep_their_messages(flag, parse, capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument(flag, type=parse)
    with pytest.raises(SystemExit):
        parser.parse_args([flag, "x"])
    assert f"invalid _share value: 'x'" in capsys.readouterr().err


def test_analyze_and_run_use_the_same_parsers():
    from pipeline import analyze, options
    flags = {}
    for module in (analyze.AnalyzeOptions, options.EmbedOptions):
        parser = argparse.ArgumentParser()
        module._add_argparse_args(parser)  # pylint: disable=protected-access
        flags.update({a.dest: a.type for a in parser._actions})
    assert flags["length_coverage"] is _positive_share
    assert flags["max_error_rate"] is _share


def test_usage_parser_raises_one_line_usage_errors():
    hinted = UsageParser(prog="x", error_hint="; see --help")
    hinted.add_argument("--n", type=int, required=True)
    with pytest.raises(UsageError) as err:
        hinted.parse_args(["--n", "a"])
    assert str(err.value) == "argument --n: invalid int value: 'a'; see --help"
    plain = UsageParser(prog="x")
    plain.add_argument("--n", required=True)
    with pytest.raises(UsageError) as err:
        plain.parse_args([])
    assert str(err.value) == "the following arguments are required: --n"


@pytest.mark.parametrize("module,argv,message", [
    ("compact", ["--index"], "argument --index: expected one argument; "
                             "see --help"),
    ("query", ["--top_k", "x"], "argument --top_k: invalid int value: 'x'"),
])
def test_compact_and_query_parse_with_the_usage_parser(module, argv,
                                                       message):
    import importlib
    parser = importlib.import_module(f"pipeline.{module}").build_parser()
    assert isinstance(parser, UsageParser)
    with pytest.raises(UsageError) as err:
        parser.parse_args(argv)
    assert str(err.value) == message


@pytest.mark.parametrize("base,parts,joined", [
    ("/data/run", ("tmp",), "/data/run/tmp"),
    ("gs://bucket/run/", ("a", "b.json"), "gs://bucket/run/a/b.json"),
    ("ram://m", ("variables", "variables"), "ram://m/variables/variables"),
])
def test_join_path(base, parts, joined):
    assert join_path(base, *parts) == joined


def test_convert_and_export_read_vocabularies_like_the_pipeline(tmp_path):
    """CRLF line ends, no newline after the last token, a token with a
    lone CR inside: the converter and the exporter count what the
    tokenizer will read."""
    from model.bert import BertConfig
    from model.export import export_bert_saved_model
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a\rb", "c"]
    path = tmp_path / "vocab.txt"
    path.write_bytes("\r\n".join(tokens).encode("utf-8"))
    assert load_vocab(str(path)) == tokens
    config = BertConfig(vocab_size=len(tokens), hidden_size=8, num_layers=1,
                        num_heads=2, intermediate_size=16,
                        max_position_embeddings=16)
    export_bert_saved_model(str(tmp_path / "m"), config, str(path))


def _calls(path: pathlib.Path, attribute: str) -> list[int]:
    """Lines of ``path`` that call ``logging.<attribute>``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == attribute
            and getattr(node.func.value, "id", None) == "logging"]


def test_no_command_configures_logging_on_its_own():
    """Every command sets its console up through ``model.console``."""
    own = []
    for package in ("model", "pipeline", "transforms", "bench", "dataflow"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "model" / "console.py":
                continue
            own += [f"{path.relative_to(ROOT)}:{line}"
                    for line in _calls(path, "basicConfig")]
    assert not own, own


@contextlib.contextmanager
def bare_root():
    """The root logger without handlers (pytest's own included) for the
    block, restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    root.handlers = []
    try:
        yield root
    finally:
        root.handlers, root.level = saved
        logging.captureWarnings(False)


def test_console_shows_our_info_only_when_verbose(capsys):
    with bare_root() as root:
        console.setup_logging(verbose=False)
        logging.getLogger("model.convert").info("quiet info")
        logging.getLogger("model.convert").warning("quiet warning")
        logging.getLogger("tensorflow").warning("library warning")
        console.setup_logging(verbose=True)  # swaps the filter
        assert len(root.handlers) == 1
        logging.getLogger("model.convert").info("verbose info")
        logging.getLogger("tensorflow").info("library info")
    err = capsys.readouterr().err
    assert "quiet warning" in err and "verbose info" in err
    for hidden in ("quiet info", "library warning", "library info"):
        assert hidden not in err
    assert " INFO model.convert: verbose info" in err


def test_console_leaves_foreign_handlers_unfiltered():
    with bare_root() as root:
        foreign = logging.StreamHandler()
        root.addHandler(foreign)
        console.setup_logging(verbose=False)
        assert foreign.filters == [] and root.handlers == [foreign]
