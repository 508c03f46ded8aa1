"""One run at a time per output: the lock, its staleness rules and stores,
two runs at one output, and outputs that cannot be written (found at launch,
before the model loads)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline.preflight
import pipeline.run
from pipeline.lock import (BeamStore, GcsStore, LocalStore, LockLost,
                           LockOwner, OutputLock, OutputLocked,
                           OutputNotWritable, lock_path, stale_reason)
from pipeline.read_embeddings import load_index
from pipeline.run import EXIT_LOCKED, EXIT_OK, EXIT_USAGE, main, run
from tests.conftest import ROOT

TEXTS = ["今天天气很好", "客服回复很及时", "北京时间昨晚"]
HOST = socket.gethostname()


def _owner(run_id="r1", host=HOST, pid=None, refreshed=None, lease=600.0,
           pid_start=None) -> LockOwner:
    return LockOwner(run_id, "out/emb", os.getpid() if pid is None else pid,
                     host, "2024-05-01T02:00:00+00:00",
                     time.time() if refreshed is None else refreshed, lease,
                     pid_start)


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True)
    return int(done.stdout)


def _write_lock(output: Path, owner: LockOwner, age: float = 0.0) -> Path:
    path = Path(lock_path(str(output)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(owner.to_bytes())
    then = time.time() - age
    os.utime(path, (then, then))
    return path


# --- staleness ---------------------------------------------------------------


def test_stale_reason_same_host_follows_the_process():
    now = time.time()
    alive = {10: True, 11: False}.get
    assert stale_reason(_owner(pid=10), now, now, HOST, alive,
                        lambda pid: None) is None
    assert "is gone" in stale_reason(_owner(pid=11), now, now, HOST, alive,
                                     lambda pid: None)
    # A pid that now belongs to another process (its start time differs).
    assert "another process" in stale_reason(
        _owner(pid=10, pid_start="100"), now, now, HOST, alive,
        lambda pid: "200")
    # Same host: an old lease does not matter while the process lives.
    assert stale_reason(_owner(pid=10, refreshed=now - 10_000), now - 10_000,
                        now, HOST, alive, lambda pid: None) is None


def test_stale_reason_other_host_follows_the_lease():
    now = time.time()
    fresh = _owner(host="elsewhere", refreshed=now - 100, lease=600)
    assert stale_reason(fresh, now - 100, now, HOST) is None
    old = _owner(host="elsewhere", refreshed=now - 700, lease=600)
    assert "not refreshed it for 700 s" in stale_reason(old, now - 700, now,
                                                         HOST)
    # A refreshed modification time (how a local holder refreshes) counts.
    assert stale_reason(old, now - 10, now, HOST) is None
    # Content nobody can read: stale only after a grace period.
    assert stale_reason(None, now - 5, now, HOST) is None
    assert "unreadable" in stale_reason(None, now - 60, now, HOST)


# --- the lock ----------------------------------------------------------------


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    output = str(tmp_path / "out" / "emb")
    with OutputLock(output, "run-a"):
        record = json.loads(Path(lock_path(output)).read_text())
        assert (record["run_id"], record["pid"], record["host"]) == \
            ("run-a", os.getpid(), HOST)
        with pytest.raises(OutputLocked) as refused:
            OutputLock(output, "run-b").acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"run run-a (pid {os.getpid()} on host {HOST}" in message
    assert not Path(lock_path(output)).exists()
    # The directory made for the lock goes with it.
    assert not (tmp_path / "out").exists()
    with OutputLock(output, "run-b"):
        pass


def test_stale_locks_are_taken_over_with_a_log_line(tmp_path, caplog):
    output = tmp_path / "emb"
    caplog.set_level(logging.WARNING, "pipeline.lock")
    _write_lock(output, _owner("dead-run", pid=_dead_pid()))
    with OutputLock(str(output), "run-b"):
        assert json.loads(Path(lock_path(str(output))).read_text())[
            "run_id"] == "run-b"
    assert "dead-run" in caplog.text and "is gone" in caplog.text

    _write_lock(output, _owner("far-run", host="elsewhere",
                               refreshed=time.time() - 700), age=700)
    with OutputLock(str(output), "run-c"):
        pass
    assert "far-run" in caplog.text and "not refreshed" in caplog.text

    _write_lock(output, _owner("far-live", host="elsewhere",
                               refreshed=time.time() - 700), age=30)
    with pytest.raises(OutputLocked, match="far-live"):
        OutputLock(str(output), "run-d").acquire()


def test_two_takeovers_of_one_stale_lock_one_wins(tmp_path):
    path = _write_lock(tmp_path / "emb",
                       _owner("dead-run", pid=_dead_pid()))
    first, second = LocalStore(str(path)), LocalStore(str(path))
    stale = first.read()
    assert first.take_over(stale, b"first") is not None
    # The second taker judged the same stale lock: it must not move the
    # first one's fresh lock away.
    assert second.take_over(stale, b"second") is None
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["emb.lock"]


def test_the_holder_refreshes_its_lease_and_notices_a_takeover(tmp_path):
    output = str(tmp_path / "emb")
    path = Path(lock_path(output))
    lock = OutputLock(output, "run-a", refresh_seconds=0.05).acquire()
    try:
        old = time.time() - 1000
        os.utime(path, (old, old))
        deadline = time.time() + 10
        while path.stat().st_mtime < old + 500 and time.time() < deadline:
            time.sleep(0.02)
        assert path.stat().st_mtime > old + 500  # refreshed
        lock.check_held()
        path.write_bytes(_owner("run-b").to_bytes())  # taken over
        with pytest.raises(LockLost, match="run-b"):
            lock.check_held()
    finally:
        lock.release()
    assert path.exists()  # another run's lock is not removed


def test_beam_store_creates_only_when_absent(tmp_path):
    path = str(tmp_path / "emb.lock")
    store = BeamStore(path, settle_seconds=0)
    assert store.create(b"a") is not None
    assert store.create(b"b") is None
    found = store.read()
    assert found.data == b"a" and found.modified > 0
    assert BeamStore(path, 0).take_over(found, b"c") is not None
    assert store.take_over(found, b"d") is None  # "a" is gone already
    assert Path(path).read_bytes() == b"c"


class _FakeGcs:
    """Enough of a google-cloud-storage client to hold one bucket whose
    objects have generations and honour ``if_generation_match``."""

    def __init__(self, exists: bool = True):
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.exists = exists
        self.generation = 0

    def bucket(self, name):
        return _FakeBucket(self)


class _FakeBucket:
    def __init__(self, client):
        self.client = client

    def blob(self, name):
        return _FakeBlob(self.client, name)

    def get_blob(self, name):
        if name not in self.client.objects:
            return None
        blob = _FakeBlob(self.client, name)
        blob.generation = self.client.objects[name][1]
        return blob


class _FakeBlob:
    def __init__(self, client, name):
        import datetime
        self.client, self.name, self.generation = client, name, None
        self.updated = datetime.datetime.now(datetime.timezone.utc)

    def _check(self, if_generation_match):
        from google.api_core import exceptions
        if not self.client.exists:
            raise exceptions.NotFound("bucket does not exist")
        current = self.client.objects.get(self.name, (b"", 0))[1]
        if if_generation_match is not None and \
                current != if_generation_match:
            raise exceptions.PreconditionFailed("generation")

    def upload_from_string(self, data, content_type=None,
                           if_generation_match=None):
        self._check(if_generation_match)
        self.client.generation += 1
        self.generation = self.client.generation
        self.client.objects[self.name] = (data, self.generation)

    def download_as_bytes(self, if_generation_match=None):
        self._check(if_generation_match)
        return self.client.objects[self.name][0]

    def delete(self, if_generation_match=None):
        from google.api_core import exceptions
        if self.name not in self.client.objects:
            raise exceptions.NotFound(self.name)
        self._check(if_generation_match)
        del self.client.objects[self.name]


def test_gcs_lock_uses_generation_preconditions():
    client = _FakeGcs()
    path = "gs://bucket/out/emb.lock"
    lock = OutputLock("gs://bucket/out/emb", "run-a", refresh_seconds=3600,
                      store=GcsStore(path, client))
    lock.acquire()
    with pytest.raises(OutputLocked, match="run-a"):
        OutputLock("gs://bucket/out/emb", "run-b",
                   store=GcsStore(path, client)).acquire()
    lock.refresh()  # conditional on the generation it wrote
    stale = GcsStore(path, client).read()
    lock.refresh()
    # A takeover conditional on an older generation does not happen.
    assert GcsStore(path, client).take_over(stale, b"x") is None
    lock.release()
    assert client.objects == {}
    with pytest.raises(OutputNotWritable, match="NotFound"):
        OutputLock("gs://nobucket/emb", "run-c",
                   store=GcsStore("gs://nobucket/emb.lock",
                                  _FakeGcs(exists=False))).acquire()


# --- the lock in a run -----------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) + "\n"
        for i, t in enumerate(TEXTS)), encoding="utf-8")
    return path


def _args(corpus: Path, output: Path, model: str) -> list[str]:
    return ["--input", str(corpus), "--output", str(output), "--model", model,
            "--max_seq_length", "32", "--outputs", "pooled"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the launcher gets as far as loading the model."""
    def probe(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was "
                             "checked")
    monkeypatch.setattr(pipeline.preflight, "probe_model", probe)


def test_an_unwritable_output_is_refused_before_the_model_loads(
        tmp_path, corpus, tiny_model_dir, no_model_load, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(_args(corpus, blocker / "emb", tiny_model_dir)) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output ") and "cannot write there" in err
    assert "\n" not in err
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only dirs")
def test_a_read_only_directory_is_refused_at_launch(
        tmp_path, corpus, tiny_model_dir, no_model_load, capsys):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        assert main(_args(corpus, readonly / "emb", tiny_model_dir)) == \
            EXIT_USAGE
    finally:
        readonly.chmod(0o755)
    assert "cannot write there" in capsys.readouterr().err


def test_the_lock_is_released_on_every_way_out(tmp_path, corpus,
                                               tiny_model_dir, monkeypatch):
    output = tmp_path / "out" / "emb"
    lock = Path(lock_path(str(output)))

    def interrupted(*args, **kwargs):
        assert lock.exists()  # held while the job resolves
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.run, "resolve_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(_args(corpus, output, tiny_model_dir))
    assert not lock.exists()
    monkeypatch.undo()
    # A usage error found after the lock was taken (no such model).
    assert main(_args(corpus, output, str(tmp_path / "no-model"))) == \
        EXIT_USAGE
    assert not lock.exists() and not output.parent.exists()


# The job, with a publish that waits for a gate file (and says it has
# started waiting in a marker file): the run is caught while publishing.
_SLOW_PUBLISH_JOB = (
    "import os, sys, time\n"
    "import pipeline.finish as finish\n"
    "publish = finish.publish\n"
    "def slow(*args, **kwargs):\n"
    "    open(os.environ['PUBLISHING_MARKER'], 'w').close()\n"
    "    deadline = time.time() + 300\n"
    "    while not os.path.exists(os.environ['GATE']) and "
    "time.time() < deadline:\n"
    "        time.sleep(0.05)\n"
    "    return publish(*args, **kwargs)\n"
    "finish.publish = slow\n"
    "from pipeline.run import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


def test_a_second_run_at_the_same_output_is_refused(tmp_path, corpus,
                                                    tiny_model_dir, capsys):
    output = tmp_path / "out" / "emb"
    marker, gate = tmp_path / "publishing", tmp_path / "gate"
    first = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PUBLISH_JOB,
         *_args(corpus, output, tiny_model_dir)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT),
                           PUBLISHING_MARKER=str(marker), GATE=str(gate)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None \
                and not marker.exists():
            time.sleep(0.05)
        assert marker.exists(), "the first run did not reach publishing"
        holder = json.loads(Path(lock_path(str(output))).read_text())
        staging = sorted(p.name for p in output.parent.iterdir()
                         if ".tmp-" in p.name)
        assert staging == [f"emb.tmp-{holder['run_id']}"]

        assert main(_args(corpus, output, tiny_model_dir)) == EXIT_LOCKED
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        assert f"in use by run {holder['run_id']} (pid {first.pid}" in err
        # The first run's staging directory is untouched.
        assert sorted(p.name for p in output.parent.iterdir()
                      if ".tmp-" in p.name) == staging
        gate.touch()
        assert first.wait(timeout=180) == EXIT_OK, first.stderr.read()[-2000:]
    finally:
        gate.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    manifest = json.loads((output.parent / "emb-manifest.json").read_text())
    assert manifest["run_id"] == holder["run_id"]
    assert manifest["files"]["embeddings"]
    assert len(load_index(str(output) + "-manifest.json")) == len(TEXTS)
    assert not Path(lock_path(str(output))).exists()
