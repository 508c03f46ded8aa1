"""Atomic output: a failed, killed or half-published run leaves nothing that
looks complete, and the next run at the same output gives a clean result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apache_beam.io.filesystems import FileSystems

import pipeline.publish
import transforms.write
from pipeline.read_embeddings import load_embeddings, load_index
from pipeline.run import RunFailed, run
from tests.conftest import ROOT

TEXTS = ["今天天气很好", "客服回复很及时", "北京时间昨晚", "手机电池续航一般"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) + "\n"
        for i, t in enumerate(TEXTS)) + "{broken\n", encoding="utf-8")
    return path


def _job(corpus: Path, out: Path, model: str, *extra: str):
    return run(["--input", str(corpus), "--output", str(out / "emb"),
                "--model", model, "--max_seq_length", "32",
                "--outputs", "pooled", *extra])


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _assert_complete(summary, out: Path) -> None:
    """A clean result: counts reconcile, the manifest lists every file, no
    staging directory is left, and the index reads back every document."""
    assert summary.status == "succeeded" and summary.reconciled
    assert (summary.counts["documents_embedded"],
            summary.counts["documents_failed"]) == (len(TEXTS), 1)
    assert not [n for n in _names(out) if ".tmp-" in n]
    manifest = json.loads((out / "emb-manifest.json").read_text("utf-8"))
    listed = {p for files in manifest["files"].values()
              for p in ([files] if isinstance(files, str) else files)}
    on_disk = {str(p) for p in out.rglob("*") if p.is_file()}
    assert on_disk == listed | {str(out / "emb-manifest.json")}
    assert load_index(str(out / "emb-manifest.json")).ids == \
        [f"d{i}" for i in range(len(TEXTS))]


def test_writer_failure_publishes_nothing_and_a_rerun_is_clean(
        corpus, tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"

    def broken_writer(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(transforms.write, "to_record_batch", broken_writer)
    with pytest.raises(RunFailed, match="nothing was published"):
        _job(corpus, out, tiny_model_dir)
    (staged,) = _names(out)  # the staging directory, nothing else
    assert staged.startswith("emb.tmp-")
    manifest = json.loads((out / staged / "emb-manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert "disk full (injected)" in manifest["failure"]
    # Other sinks may have finished inside the staging directory: still
    # nothing under a final name.
    assert not list(out.glob("emb-*"))

    monkeypatch.undo()
    summary = _job(corpus, out, tiny_model_dir)
    _assert_complete(summary, out)


# The job, with a writer that stalls (and says so in a marker file) once its
# first rows arrive: the run is killed while it is writing, whatever the
# machine's speed.
_STALLING_JOB = (
    "import os, sys, time\n"
    "import transforms.write as write\n"
    "convert = write.to_record_batch\n"
    "def stall(*args, **kwargs):\n"
    "    open(os.environ['STALLED_MARKER'], 'w').close()\n"
    "    time.sleep(600)\n"
    "    return convert(*args, **kwargs)\n"
    "write.to_record_batch = stall\n"
    "from pipeline.run import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


def test_killed_run_leaves_only_staging_and_the_next_run_cleans_it(
        corpus, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    stalled = tmp_path / "stalled"
    process = subprocess.Popen(
        [sys.executable, "-c", _STALLING_JOB, "--input", str(corpus),
         "--output", str(out / "emb"), "--model", tiny_model_dir,
         "--max_seq_length", "32", "--outputs", "pooled"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT),
                           STALLED_MARKER=str(stalled)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None \
                and not stalled.exists():
            time.sleep(0.05)
        assert stalled.exists(), "the run did not reach its writer"
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # The staging directory, and the lock the killed run could not remove:
    # its process is gone, so the next run takes it over.
    lock, staged = _names(out)
    assert staged.startswith("emb.tmp-") and lock == "emb.lock"
    assert not list(out.glob("emb-*"))

    summary = _job(corpus, out, tiny_model_dir)
    _assert_complete(summary, out)


def test_crash_while_publishing_leaves_no_manifest_and_rerun_replaces_all(
        corpus, tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    first = _job(corpus, out, tiny_model_dir, "--num_shards", "3")
    assert len(first.outputs["embeddings"]) == 3

    class CrashBeforeManifest:
        """FileSystems, except that renaming the manifest fails."""

        def __getattr__(self, name):
            return getattr(FileSystems, name)

        @staticmethod
        def rename(sources, targets):
            if any(s.endswith("-manifest.json") for s in sources):
                raise OSError("killed while publishing (injected)")
            return FileSystems.rename(sources, targets)

    monkeypatch.setattr(pipeline.publish, "FileSystems",
                        CrashBeforeManifest())
    with pytest.raises(RunFailed, match="has no manifest"):
        _job(corpus, out, tiny_model_dir, "--num_shards", "1")
    # The earlier run's manifest went first: nothing describes a complete
    # run at this output now.
    assert not (out / "emb-manifest.json").exists()
    with pytest.raises(ValueError, match="not a readable run manifest"):
        load_index(str(out / "emb-manifest.json"))

    monkeypatch.undo()
    summary = _job(corpus, out, tiny_model_dir, "--num_shards", "2")
    _assert_complete(summary, out)
    assert len(summary.outputs["embeddings"]) == 2  # no shard of 3 is left
    assert len(load_embeddings(str(out / "emb-*-of-*.parquet"))) == len(TEXTS)


def test_a_missing_shard_is_refused(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "out"
    summary = _job(corpus, out, tiny_model_dir, "--num_shards", "2")
    Path(summary.outputs["embeddings"][0]).unlink()
    with pytest.raises(ValueError, match="incomplete dataset"):
        load_embeddings(str(out / "emb-*-of-*.parquet"))
