"""The stages' settings classes: each checks its own fields once, when it is
made, with a one-line message; ``max_seq_length`` and ``precision`` are each
checked by one function that every entry point (``pipeline.run``,
``pipeline.analyze``, ``pipeline.embed.embed_texts``) goes through."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

import transforms.infer
import transforms.tokenize
from pipeline import analyze
from pipeline.cli import UsageError
from pipeline.embed import embed_texts
from pipeline.options import EmbedOptions
from pipeline.run import EXIT_USAGE, main, resolve_job
from transforms.batch import BatchSettings
from transforms.infer import InferSettings
from transforms.read import ReadSettings
from transforms.tokenize import TokenizeSettings
from transforms.write import WriteSettings

BAD_VALUES = [
    (ReadSettings, {"input_format": "xml"},
     "input_format must be one of ('auto', "),
    (ReadSettings, {"input_encoding": "latin-9"},
     "encoding must be one of ("),
    (ReadSettings, {"max_text_chars": 0}, "max_text_chars must be positive"),
    (TokenizeSettings, {"max_seq_length": 2},
     "max_seq_length must be at least 3 ([CLS], one token, [SEP])"),
    (TokenizeSettings, {"long_text": "drop"},
     "long_text must be one of ('truncate', 'chunk')"),
    (TokenizeSettings, {"max_seq_length": 10, "chunk_stride": 9},
     "chunk_stride must be at most max_seq_length - 2 (chunks must not "
     "skip tokens)"),
    (TokenizeSettings, {"chunk_stride": -1}, "chunk_stride must be positive"),
    (BatchSettings, {"batch_size": 0},
     "batch_size, max_tokens_per_batch and sort_window must be positive"),
    (BatchSettings, {"max_tokens_per_batch": 0},
     "batch_size, max_tokens_per_batch and sort_window must be positive"),
    (BatchSettings, {"sort_window": 0},
     "batch_size, max_tokens_per_batch and sort_window must be positive"),
    (BatchSettings, {"bucket_boundaries": [16, 8]},
     "bucket_boundaries must be a non-empty, strictly increasing list of "
     "positive ints, got [16, 8]"),
    (InferSettings, {"model_dir": "/m", "outputs": ("cls",)},
     "outputs must be a non-empty subset of ('pooled', 'sequence'), "
     "got ['cls']"),
    (InferSettings, {"model_dir": "/m", "outputs": ()},
     "outputs must be a non-empty subset of"),
    (InferSettings, {"model_dir": "/m", "precision": "float16"},
     "precision must be one of ('auto', 'float32', 'bfloat16', 'int8')"),
    (InferSettings, {"model_dir": "/m", "pooling": "max"},
     "pooling must be one of "),
    (InferSettings, {"model_dir": "/m", "pooling": "first_last_avg",
                     "engine": "openvino"},
     "pooling first_last_avg needs the model's encoder_outputs, which only "
     "the tensorflow engine returns"),
    (WriteSettings, {"sequence_dtype": "int8"},
     "'int8' is not one of ('float32', 'float16')"),
    (WriteSettings, {"row_group_rows": -1}, "row_group_rows must be >= 0"),
]


@pytest.mark.parametrize(
    "make, fields, message", BAD_VALUES,
    ids=[f"{make.__name__}-{'-'.join(fields)}" for make, fields, _ in
         BAD_VALUES])
def test_each_settings_class_rejects_a_bad_value_in_one_line(
        make: Callable[..., Any], fields: dict[str, Any], message: str):
    with pytest.raises(ValueError) as caught:
        make(**fields)
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text


def test_settings_are_frozen_and_keep_good_values():
    tokenize = TokenizeSettings(3, "chunk", 1)  # the shortest length
    assert (tokenize.window, tokenize.stride,
            tokenize.effective_stride) == (1, 1, 1)
    assert TokenizeSettings(32).effective_stride is None
    batch = BatchSettings(bucket_boundaries=[8, 16], max_seq_length=64)
    assert batch.bucket_boundaries == (8, 16) and batch.pad_to_steps is None
    assert dataclasses.replace(batch, step_padding=True).pad_to_steps == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        tokenize.max_seq_length = 2  # type: ignore[misc]


def _counting(monkeypatch, module: Any, name: str) -> list[Any]:
    """Wraps ``module.name`` so that every call is recorded."""
    calls: list[Any] = []
    real = getattr(module, name)

    def counted(value: Any) -> Any:
        calls.append(value)
        return real(value)
    monkeypatch.setattr(module, name, counted)
    return calls


class _Refused(ValueError):
    pass


def _refusing(monkeypatch, module: Any, name: str) -> None:
    """Makes ``module.name`` refuse every value."""
    def refuse(value: Any) -> Any:
        raise _Refused(f"{name} refused {value}")
    monkeypatch.setattr(module, name, refuse)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "今天天气很好"}\n', encoding="utf-8")
    return path


def _run_flags(corpus: Path, tmp_path: Path, model: str) -> list[str]:
    return ["--input", str(corpus), "--output", str(tmp_path / "out/emb"),
            "--model", model, "--max_seq_length", "32", "--xla", "off"]


def test_max_seq_length_is_checked_by_one_function_everywhere(
        monkeypatch, corpus, tmp_path, tiny_model_dir, capsys):
    """Each entry point checks ``max_seq_length`` exactly once, through
    ``validate_max_seq_length``; when that refuses, all of them fail."""
    module = transforms.tokenize
    calls = _counting(monkeypatch, module, "validate_max_seq_length")
    flags = _run_flags(corpus, tmp_path, tiny_model_dir)
    job = resolve_job(PipelineOptions(flags).view_as(EmbedOptions))
    assert calls == [32] and job.config.tokenize.max_seq_length == 32
    assert job.config.batch.max_seq_length == 32
    calls.clear()
    analyze.resolve_analysis(PipelineOptions(
        ["--input", str(corpus), "--model", tiny_model_dir,
         "--max_seq_length", "16"]))
    assert calls == [16]
    calls.clear()
    embed_texts(["你好"], model=tiny_model_dir, max_seq_length=24)
    assert calls == [24]

    monkeypatch.undo()
    _refusing(monkeypatch, module, "validate_max_seq_length")
    assert main(flags) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == \
        "error: --validate_max_seq_length refused 32"
    assert not (tmp_path / "out").exists()
    assert analyze.main(["--input", str(corpus), "--model", tiny_model_dir,
                         "--max_seq_length", "16"]) == EXIT_USAGE
    assert "validate_max_seq_length refused 16" in capsys.readouterr().err
    with pytest.raises(UsageError, match="validate_max_seq_length refused"):
        embed_texts(["你好"], model=tiny_model_dir, max_seq_length=25)


def test_precision_is_checked_by_one_function_everywhere(
        monkeypatch, corpus, tmp_path, tiny_model_dir, capsys):
    """``check_precision`` checks a run's and ``embed_texts``' precision
    once; when it refuses, both fail (``pipeline.analyze`` has none)."""
    module = transforms.infer
    calls = _counting(monkeypatch, module, "check_precision")
    flags = _run_flags(corpus, tmp_path, tiny_model_dir)
    resolve_job(PipelineOptions(flags + ["--precision", "float32"]
                                ).view_as(EmbedOptions))
    assert calls == ["float32"]
    calls.clear()
    embed_texts(["你好"], model=tiny_model_dir, max_seq_length=32,
                precision="float32")
    assert calls == ["float32"]

    monkeypatch.undo()
    _refusing(monkeypatch, module, "check_precision")
    assert main(flags + ["--precision", "float32"]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == \
        "error: --check_precision refused float32"
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="check_precision refused"):
        embed_texts(["你好"], model=tiny_model_dir, max_seq_length=32)


def test_the_manifest_options_stay_one_flat_record(corpus, tmp_path,
                                                   tiny_model_dir):
    """``JobConfig.options`` keeps the manifest's ``options`` as flat as
    before the settings were split by stage: one key per setting, and
    every stage's setting under its flag's name."""
    config = resolve_job(PipelineOptions(
        _run_flags(corpus, tmp_path, tiny_model_dir)
        + ["--bucket_boundaries", "8,16", "--parquet_row_group_rows", "7",
           "--pooling", "mean"]).view_as(EmbedOptions)).config
    options = json.loads(json.dumps(config.options()))
    assert not any(isinstance(v, dict) for v in options.values())
    assert "vocab" not in options
    assert options["max_seq_length"] == 32
    assert options["bucket_boundaries"] == [8, 16]
    assert options["parquet_row_group_rows"] == 7
    assert options["pooling"] == "mean"
    assert options["model_dir"] == tiny_model_dir
    assert options["input_encoding"] == "utf-8"
    assert options["jit_compile"] is False
