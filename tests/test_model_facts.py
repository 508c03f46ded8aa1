"""What the launcher learns about a model, kept by the model's content
(``model.facts``): a later process gets the same answers without
TensorFlow; a changed model, a failed check, a corrupt or unwritable cache
never give a stale or wrong answer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model import facts, load
from model.errors import ModelFormatError
from model.load import probe_encoder_layers, probe_model
from model.variables import read_lower_case_flag, read_model_limits
from model.vocab import read_tokenizer_settings
from tests.conftest import export_small_bert

ROOT = Path(__file__).resolve().parent.parent

# Every answer the launcher's checks read from a model, as JSON.
_ANSWERS = """
import json, sys
from model.load import probe_encoder_layers, probe_model
from model.variables import infer_hidden_size, read_model_limits
from model.vocab import load_vocab, read_tokenizer_settings
path = sys.argv[1]
settings = read_tokenizer_settings(path)
print(json.dumps({
    "limits": read_model_limits(path).__dict__,
    "do_lower_case": settings.do_lower_case,
    "vocab_path": settings.vocab_path,
    "hidden_size": infer_hidden_size(path,
                                     len(load_vocab(settings.vocab_path))),
    "output_width": probe_model(path),
    "encoder_layers": probe_encoder_layers(path),
    "tensorflow_imported": sys.modules.get("tensorflow") is not None}))
"""


def _answers_in_new_process(model: str, cache: Path,
                            without_tensorflow: bool) -> dict:
    code = _ANSWERS
    if without_tensorflow:  # any "import tensorflow" now fails
        code = "import sys; sys.modules['tensorflow'] = None\n" + code
    done = subprocess.run(
        [sys.executable, "-c", code, model], capture_output=True, text=True,
        timeout=600, cwd=ROOT,
        env=dict(os.environ, BERT_ZH_EMBED_CACHE=str(cache),
                 PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_later_process_gets_every_answer_without_tensorflow(
        tiny_model_dir, tmp_path):
    first = _answers_in_new_process(tiny_model_dir, tmp_path / "cache",
                                    without_tensorflow=False)
    later = _answers_in_new_process(tiny_model_dir, tmp_path / "cache",
                                    without_tensorflow=True)
    assert first.pop("tensorflow_imported") is True
    assert later.pop("tensorflow_imported") is False
    assert later == first
    assert first["output_width"] == first["hidden_size"] == 32
    assert first["limits"]["max_positions"] == 128
    assert first["encoder_layers"] == 2


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("BERT_ZH_EMBED_CACHE", str(path))
    return path


@pytest.fixture
def model(tiny_model_dir, tmp_path) -> str:
    """A copy of the tiny model that a test may replace."""
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    return str(path)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, small_vocab) -> str:
    """Another model (hidden 16, 64 positions, upper case kept)."""
    return export_small_bert(
        tmp_path_factory.mktemp("other") / "bert", small_vocab,
        hidden_size=16, num_layers=1, max_positions=64, do_lower_case=False,
        seed=3)


def _counting(monkeypatch, module, name: str) -> list:
    """Counts the calls of ``module.name`` (the real reading)."""
    real, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_replaced_model_is_read_again(model, other_model, cache,
                                        monkeypatch):
    probes = _counting(monkeypatch, load, "_probe_width")
    assert (probe_model(model), probe_model(model)) == (32, 32)
    assert len(probes) == 1  # the second answer was kept
    assert read_model_limits(model).max_positions == 128
    assert read_lower_case_flag(model) is True

    shutil.rmtree(model)
    shutil.copytree(other_model, model)
    assert probe_model(model) == 16 and len(probes) == 2
    assert read_model_limits(model).max_positions == 64
    assert read_lower_case_flag(model) is False
    assert read_tokenizer_settings(model).do_lower_case is False


def test_a_failed_check_is_not_kept(model, cache, monkeypatch):
    real = load._probe_width

    def broken(model_dir):
        raise ModelFormatError(f"{model_dir}: a test call failed")
    monkeypatch.setattr(load, "_probe_width", broken)
    for _ in range(2):
        with pytest.raises(ModelFormatError, match="a test call failed"):
            probe_model(model)
    path = facts.facts_file(model)
    assert not os.path.exists(path) or "output_width" not in json.loads(
        Path(path).read_text("utf-8"))
    monkeypatch.setattr(load, "_probe_width", real)
    assert probe_model(model) == 32


def test_corrupt_or_foreign_answers_are_read_again(model, cache,
                                                   monkeypatch):
    want = (probe_model(model), read_model_limits(model),
            read_tokenizer_settings(model))
    path = Path(facts.facts_file(model))
    for kept in ("not json", json.dumps([1, 2]), json.dumps(
            {"output_width": 32, "embedding_tables": 5,
             "vocab_asset": "vocab.txt", "do_lower_case_variable": True})):
        path.write_text(kept, "utf-8")
        got = (probe_model(model), read_model_limits(model),
               read_tokenizer_settings(model))
        assert got == want, kept
    assert isinstance(json.loads(path.read_text("utf-8"))[
        "embedding_tables"], list)


def test_an_unwritable_cache_only_costs_the_reading(model, tmp_path,
                                                    monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BERT_ZH_EMBED_CACHE", str(blocker))
    probes = _counting(monkeypatch, load, "_probe_width")
    assert probe_model(model) == probe_model(model) == 32
    assert len(probes) == 2


def test_only_local_savedmodels_with_variables_are_kept(model, cache,
                                                        tmp_path,
                                                        monkeypatch):
    assert facts.facts_file("gs://bucket/model") is None
    assert facts.facts_file(str(tmp_path / "missing")) is None
    empty = tmp_path / "no-variables"
    empty.mkdir()
    (empty / "saved_model.pb").write_bytes(b"")
    assert facts.facts_file(str(empty)) is None
    kept = facts.facts_file(model)
    assert kept.startswith(str(cache))
    monkeypatch.setattr(facts, "_tensorflow_version", lambda: "9.9.9")
    assert facts.facts_file(model) != kept  # another TensorFlow reads again
    assert probe_encoder_layers(model) == 2
