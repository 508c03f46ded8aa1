"""The Flex Template: its metadata is the job's flags, and its launch is the
launch of ``python -m pipeline.run`` (staging, checks, publish, summary,
manifest), so a Flex run can be the next run's ``--previous_index``.

The launches run on the DirectRunner: what differs on Dataflow (the runner
and the paths) is the same in both launch paths.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.options import embed_flags
from tests.conftest import ROOT

REQUIRED = {"input", "output", "model"}
# Values a console user might type: each must either be refused by the
# parameter's expression or be taken by the flag.  (Not "32,16": that bucket
# boundaries increase is beyond a regular expression; the launch refuses
# them with exit 2.)
SAMPLES = ("0", "1", "3", "8", "128", "007", "-3", "1.5", "0.5", ".25", "1e3",
           "abc", "", " ", "16,32", "8,16,8x", "pooled", "pooled,sequence",
           "pooled,", "true", "false", "auto", "none", "gs://b-1/x",
           "/local/x")


def _load(name: str) -> Any:
    """A file of ``dataflow/`` as a module (the launcher runs them by
    path)."""
    spec = importlib.util.spec_from_file_location(
        f"dataflow_{name}", ROOT / "dataflow" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flex_main() -> Any:
    return _load("flex_main")


@pytest.fixture(scope="module")
def flex_metadata() -> Any:
    return _load("flex_metadata")


@pytest.fixture(scope="module")
def metadata() -> dict:
    path = ROOT / "dataflow" / "flex_template_metadata.json"
    return json.loads(path.read_text(encoding="utf-8"))


def test_metadata_file_is_generated_from_the_options(flex_metadata):
    path = ROOT / "dataflow" / "flex_template_metadata.json"
    assert path.read_text(encoding="utf-8") == flex_metadata.render(), \
        "stale: run python -m dataflow.flex_metadata"


def test_template_parameters_are_the_job_flags(metadata):
    flags = embed_flags()
    params = metadata["parameters"]
    assert [p["name"] for p in params] == list(flags)
    assert metadata["streaming"] is False
    assert {p["name"] for p in params if not p["isOptional"]} == REQUIRED
    for param in params:
        action = flags[param["name"]]
        assert param["label"]
        assert param["helpText"].startswith(action.help.replace("%%", "%"))
        if action.default is not None:
            assert "Default: " in param["helpText"]


def _takes(action: argparse.Action, value: str) -> bool:
    """Whether the flag's own parsing accepts ``value``."""
    if action.choices:
        return value in action.choices
    if action.nargs == 0:
        return value in ("true", "false")
    try:
        (action.type or str)(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False
    return True


def test_parameter_expressions_accept_only_what_the_flags_take(
        metadata, flex_metadata):
    flags = embed_flags()
    for param in metadata["parameters"]:
        action = flags[param["name"]]
        patterns = [re.compile(r) for r in param.get("regexes", [])]

        def accepted(value: str) -> bool:
            return all(p.fullmatch(value) for p in patterns)

        if action.default is not None:
            assert accepted(flex_metadata.template_value(action.default)), \
                param["name"]
        for value in SAMPLES:
            if accepted(value):
                assert _takes(action, value), (param["name"], value)
        if action.choices:
            assert [c for c in action.choices if accepted(c)] == \
                list(action.choices), param["name"]
    by_name = {p["name"]: p for p in metadata["parameters"]}
    for name in ("input", "output", "model", "vocab_file", "analysis",
                 "previous_index"):
        (pattern,) = by_name[name]["regexes"]
        assert re.fullmatch(pattern, "gs://my-bucket/a/b-*.jsonl"), name
        assert not re.fullmatch(pattern, "/local/path"), name


def test_boolean_parameters_become_plain_flags(flex_main, metadata, capsys):
    booleans = [p["name"] for p in metadata["parameters"]
                if p.get("regexes") == ["^(true|false)$"]]
    assert booleans and set(booleans) == set(flex_main.boolean_flags())
    for name in booleans:
        assert flex_main.normalize_boolean_flags(
            [f"--{name}=true", "--x=1"]) == [f"--{name}", "--x=1"]
        assert flex_main.normalize_boolean_flags([f"--{name}=false"]) == []
    assert flex_main.main([f"--{booleans[0]}=maybe"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: --{booleans[0]} takes true or false, got 'maybe'"


def test_flex_launch_refuses_unknown_flags_like_the_cli(flex_main, capsys):
    assert flex_main.main(["--input=x", "--max_seq_lenght=16"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "did you mean --max_seq_length?" in line


def test_flex_launch_publishes_a_run_the_next_launch_builds_on(
        flex_main, tmp_path, tiny_model_dir, e2e_corpus):
    """Template parameters as the launcher passes them (``--name=value``,
    booleans as true/false): the run is staged, checked and published with
    its summary and manifest, and the next launch takes it as its previous
    index."""
    out = tmp_path / "emb"
    params = {"input": e2e_corpus, "output": out, "model": tiny_model_dir,
              "input_format": "jsonl", "format": "tfrecord",
              "outputs": "pooled", "max_seq_length": "32",
              "long_text": "chunk", "chunk_stride": "16",
              "document_vectors": "true", "dedup": "false",
              "write_text": "true", "batch_size": "4",
              "max_tokens_per_batch": "256", "num_shards": "1",
              "xla": "off", "tf_intra_op_threads": "1",
              "progress_interval": "0", "max_error_rate": "0.5"}
    argv = [f"--{k}={v}" for k, v in params.items()] + [
        "--runner=DirectRunner"]
    assert flex_main.main(argv) == 0
    manifest = json.loads(Path(f"{out}-manifest.json").read_text("utf-8"))
    summary = json.loads(Path(f"{out}-summary.json").read_text("utf-8"))
    assert manifest["status"] == summary["status"] == "succeeded"
    embedded = summary["counts"]["documents_embedded"]
    assert embedded > 0 and summary["reconciled"]
    assert glob.glob(f"{out}-00000-of-00001.tfrecord")
    assert glob.glob(f"{out}-documents-*.tfrecord")  # document_vectors=true
    assert not glob.glob(f"{out}.tmp-*")  # staging published and removed

    again = tmp_path / "emb2"
    assert flex_main.main(argv + [f"--output={again}",
                                  f"--previous_index={out}"]) == 0
    counts = json.loads(Path(f"{again}-summary.json").read_text(
        "utf-8"))["counts"]
    assert counts["documents_unchanged"] == embedded
    assert counts["documents_embedded"] == 0
