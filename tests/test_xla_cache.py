"""The XLA compile cache: entries published whole, split by machine kind,
and reused by a later run (``model.xla_cache``)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from model import xla_cache
from model.xla_cache import CompileCache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_process_cache():
    xla_cache.reset_for_tests()
    yield
    xla_cache.reset_for_tests()


def _entry(directory: Path, name: str, payload: bytes = b"x" * 100) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"xla_compile_cache__{name}__XLA_CPU_JIT.pb"
    path.write_bytes(payload)
    return path


def test_resolve_root(monkeypatch):
    monkeypatch.setenv("BERT_ZH_EMBED_CACHE", "/cache/home")
    assert xla_cache.resolve_root("auto") == "/cache/home/xla"
    assert xla_cache.resolve_root("none") is None
    assert xla_cache.resolve_root("") is None
    assert xla_cache.resolve_root("gs://b/xla") == "gs://b/xla"


def test_machine_key_names_tensorflow_and_changes_with_the_cpu(monkeypatch):
    key = xla_cache.machine_key()
    assert re.fullmatch(r"tf[\w.]+-\w+-[0-9a-f]{16}", key)
    assert key.startswith(f"tf{tf.__version__}-")
    monkeypatch.setattr(xla_cache, "cpu_flags",
                        lambda: frozenset({"avx2", "avx512f"}))
    with_avx512 = xla_cache.machine_key()
    monkeypatch.setattr(xla_cache, "cpu_flags", lambda: frozenset({"avx2"}))
    assert xla_cache.machine_key() != with_avx512
    without = xla_cache.machine_key()
    monkeypatch.setattr(xla_cache, "_gpu_models", lambda: ["NVIDIA H100"])
    assert xla_cache.machine_key() != without


def test_publish_puts_new_whole_entries_in_the_shared_directory(tmp_path):
    shared, staging = tmp_path / "shared", tmp_path / "staging"
    cache = CompileCache(str(shared), str(staging))
    first = _entry(staging, "1__1")
    (staging / ".partial.tmp").write_bytes(b"half")  # not an entry
    assert cache.publish() == 1
    assert sorted(p.name for p in shared.iterdir()) == [first.name]
    assert (shared / first.name).read_bytes() == first.read_bytes()
    assert cache.publish() == 0  # nothing new
    second = _entry(staging, "2__2")
    assert cache.publish() == 1
    assert (shared / second.name).exists()


def test_publish_keeps_an_entry_another_process_published(tmp_path):
    shared, staging = tmp_path / "shared", tmp_path / "staging"
    theirs = _entry(shared, "1__1", b"theirs")
    _entry(staging, "1__1", b"ours")
    assert CompileCache(str(shared), str(staging)).publish() == 0
    assert theirs.read_bytes() == b"theirs"


def test_publish_copies_then_renames_where_it_cannot_link(tmp_path,
                                                          monkeypatch):
    shared, staging = tmp_path / "shared", tmp_path / "staging"
    entry = _entry(staging, "1__1")
    monkeypatch.setattr(os, "link", _raise(OSError("cross-device link")))
    renames = []
    real_rename = tf.io.gfile.rename

    def rename(source, target, overwrite=False):
        # The final name appears only by the rename, whole.
        assert not os.path.exists(target)
        assert Path(source).read_bytes() == entry.read_bytes()
        renames.append((Path(source).name, Path(target).name))
        real_rename(source, target, overwrite)

    monkeypatch.setattr(tf.io.gfile, "rename", rename)
    assert CompileCache(str(shared), str(staging)).publish() == 1
    assert len(renames) == 1 and renames[0][0].startswith(".")
    assert [p.name for p in shared.iterdir()] == [entry.name]


def test_entries_travel_through_a_tensorflow_file_system(tmp_path):
    """A non-local shared directory (ram:// standing in for gs://)."""
    shared = "ram://xla-cache-test/tf-x86_64-0"
    staging = tmp_path / "staging"
    entry = _entry(staging, "1__1")
    assert CompileCache(shared, str(staging)).publish() == 1
    assert tf.io.gfile.listdir(shared) == [entry.name]
    later = tmp_path / "later"
    later.mkdir()
    assert CompileCache(shared, str(later)).load_entries() == 1
    assert (later / entry.name).read_bytes() == entry.read_bytes()


def test_load_entries_seeds_staging_once_and_skips_temporary_files(tmp_path):
    shared, staging = tmp_path / "shared", tmp_path / "staging"
    entry = _entry(shared, "1__1")
    (shared / f".{entry.name}.abc.tmp").write_bytes(b"half")
    staging.mkdir()
    cache = CompileCache(str(shared), str(staging))
    assert cache.load_entries() == 1
    assert cache.load_entries() == 0
    assert [p.name for p in staging.iterdir()] == [entry.name]
    assert cache.publish() == 0  # already shared


def test_staging_copies_are_not_links_and_published_entries_are(tmp_path):
    """TensorFlow may rewrite a staging file (one it failed to load): that
    must never change a shared entry in place.  Its new entries are written
    once, so publishing may link them."""
    shared, staging = tmp_path / "shared", tmp_path / "staging"
    loaded = _entry(shared, "1__1")
    staging.mkdir()
    cache = CompileCache(str(shared), str(staging))
    cache.load_entries()
    assert not os.path.samefile(staging / loaded.name, loaded)
    new = _entry(staging, "2__2")
    assert cache.publish() == 1
    assert os.path.samefile(shared / new.name, new)


def test_an_unusable_cache_warns_once_and_never_fails(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    staging = tmp_path / "staging"
    _entry(staging, "1__1")
    cache = CompileCache(str(blocker / "sub"), str(staging))
    with caplog.at_level(logging.WARNING, logger="model.xla_cache"):
        assert cache.publish() == 0
        _entry(staging, "2__2")
        assert cache.publish() == 0
    assert caplog.text.count("cannot write the XLA compile cache") == 1


def test_no_cache_once_tensorflow_has_started(tmp_path, fresh_process_cache,
                                              caplog):
    tf.constant(1)  # the runtime, and its XLA flags, are set up
    with caplog.at_level(logging.INFO, logger="model.xla_cache"):
        assert xla_cache.process_cache(str(tmp_path)) is None
    assert "already started" in caplog.text
    assert xla_cache.process_cache("none") is None  # decided once


def test_no_cache_when_off_or_when_tf_xla_flags_names_one(
        tmp_path, fresh_process_cache, monkeypatch):
    assert xla_cache.process_cache("none") is None
    xla_cache.reset_for_tests()
    monkeypatch.setenv("TF_XLA_FLAGS",
                       "--tf_xla_persistent_cache_directory=/their/own")
    assert xla_cache.process_cache(str(tmp_path)) is None


_SET_UP = """
import os, sys
from model import xla_cache
cache = xla_cache.process_cache(sys.argv[1])
print(cache is not None, os.environ.get("TF_XLA_FLAGS"))
"""


@pytest.mark.parametrize("flags", [None, "--tf_xla_auto_jit=-1"])
def test_the_cache_flag_is_not_left_for_child_processes(tmp_path, flags):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_XLA_FLAGS", None)
    if flags:
        env["TF_XLA_FLAGS"] = flags
    done = subprocess.run([sys.executable, "-c", _SET_UP, str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    assert done.stdout.split() == ["True", str(flags)]


def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail


_JOB = ("import sys; from pipeline.run import main; "
        "sys.exit(main(sys.argv[1:]))")


def _run_job(corpus: Path, out: Path, model_dir: str, cache: Path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, "-c", _JOB, "--input", str(corpus), "--output",
         str(out), "--model", model_dir, "--runner", "DirectRunner",
         "--max_seq_length", "32", "--batch_size", "4",
         "--engine", "tensorflow", "--precision", "float32", "--xla", "on",
         "--xla_cache_dir", str(cache), "--verbose"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_a_second_run_loads_what_the_first_compiled(tmp_path, e2e_corpus,
                                                    tiny_model_dir):
    """Two runs of the same job, each in a fresh process as a scheduled
    run would be: the first compiles and publishes, the second loads every
    shape from the cache (and says so: loading is not compiling) and writes
    the same embeddings."""
    from pipeline.read_embeddings import load_embeddings
    cache = tmp_path / "xla"
    first = _run_job(e2e_corpus, tmp_path / "a" / "emb", tiny_model_dir,
                     cache)
    compiled = re.findall(r"XLA compiled the model for input shape .*?"
                          r"(\d+) new cache entries", first)
    published = sum(int(n) for n in compiled)
    entries = [p for p in cache.glob("*/*.pb")]
    assert len(compiled) >= 2 and published == len(entries) >= len(compiled)
    assert {p.parent.name for p in entries} == {xla_cache.machine_key()}

    second = _run_job(e2e_corpus, tmp_path / "b" / "emb", tiny_model_dir,
                      cache)
    assert f"{len(entries)} executables from earlier runs" in second
    assert not re.search(r"XLA compiled", second)
    loaded = re.findall(r"XLA loaded the model for input shape (\[.*?\]) "
                        r"from the compile cache", second)
    shapes = re.findall(r"XLA compiled the model for input shape (\[.*?\])",
                        first)
    assert sorted(loaded) == sorted(shapes)
    assert len(list(cache.glob("*/*.pb"))) == len(entries)

    a = load_embeddings(str(tmp_path / "a" / "emb-*-of-*.parquet"))
    b = load_embeddings(str(tmp_path / "b" / "emb-*-of-*.parquet"))
    assert list(a.ids) == list(b.ids) and len(a.ids) == 8
    np.testing.assert_allclose(np.stack(b.pooled_output),
                               np.stack(a.pooled_output), atol=1e-6, rtol=0)
