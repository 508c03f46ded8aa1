"""The pipeline on Beam's portable runner, with SDK workers in other processes.

This is the same engine layout as a Flink or Spark cluster, all on this
machine and with nothing to download:

* a **worker pool** process (``apache_beam.runners.worker.worker_pool_main``)
  that starts each SDK worker as a separate ``python`` process when the
  runner asks for one (``--environment_type EXTERNAL``);
* a **job service**: either a separate process
  (``apache_beam.runners.portability.local_job_service_main``, reached at
  ``--job_endpoint localhost:PORT``; the launcher only submits the job over
  the Job API) or embedded in the launcher (``--job_endpoint embed``);
* the launcher, ``pipeline.run.run([...])``, in this test process.

The workers import the project from ``PYTHONPATH`` (a real cluster installs
it in the worker image).  Each run must write exactly what the DirectRunner
writes for the same input, count the same, and load the model in a worker
process, not in this one.

Before a run, the launcher checks that the pool starts a worker that
connects (``pipeline.worker_pool``): no pool, or a pool whose ``python``
cannot run a Beam worker, ends the launch with one line instead of a hang;
and the recipe for starting a pool (docs/runners.md) works as written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from model import load as model_load
from pipeline.read_embeddings import load_embeddings
from pipeline.run import run
from pipeline.summary import COUNTERS, RunSummary
from pipeline.worker_pool import (WorkerPoolUnavailable, check_environment,
                                  check_worker_pool, is_local, pool_address)
from tests.conftest import E2E_TEXTS, ROOT

MAX_SEQ = 32
START_TIMEOUT_S = 60.0
_POOL_ADDRESS = re.compile(r"Started worker pool servicer at port: (\S+)")

# worker_pool_main logs its address at INFO, which is only printed once
# logging has a handler; port 0 lets the OS pick a free port.
_POOL_COMMAND = (
    "import logging; logging.basicConfig(level=logging.INFO); "
    "from apache_beam.runners.worker import worker_pool_main; "
    "worker_pool_main.main(['--service_port', '0'])")


def _service_env() -> dict[str, str]:
    """Environment of the services and of the workers they start.

    The pool starts workers as ``python -c ...``, so this interpreter's
    directory goes first on ``PATH``; ``PYTHONPATH`` makes the project
    importable in the workers.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                   env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _start(args: list[str], log: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen:
    """Starts a service in its own process group, logging to ``log``."""
    with log.open("wb") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT,
                                env=env or _service_env(), cwd=cwd,
                                start_new_session=True)


def _stop(process: subprocess.Popen, sig: int) -> None:
    """Asks a service to exit (it stops its workers), then makes sure."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:  # the service and any worker it left behind share its group
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _wait_for(found: Callable[[], str | None], process: subprocess.Popen,
              log: Path) -> str:
    """Polls ``found`` until it returns a value; fails with the log."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        if process.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"service did not start: {log.read_text(errors='replace')}")


def _pool_address(log: Path) -> Callable[[], str | None]:
    """Reads the pool's ``host:port`` from its log, once it is there."""
    def found() -> str | None:
        match = _POOL_ADDRESS.search(log.read_text(errors="replace"))
        return match.group(1) if match else None
    return found


def _port_in(path: Path) -> Callable[[], str | None]:
    """Reads the job service's port file, once it is there."""
    def found() -> str | None:
        return path.read_text().strip() if path.exists() else None
    return found


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A worker pool and a job service, each in its own process."""
    root = tmp_path_factory.mktemp("portable_services")
    pool_log, job_log = root / "pool.log", root / "job_service.log"
    port_file = root / "job_service.port"
    pool = _start([sys.executable, "-c", _POOL_COMMAND], pool_log)
    job_service = _start(
        [sys.executable, "-m",
         "apache_beam.runners.portability.local_job_service_main",
         "--port", "0", "--port_file", str(port_file),
         "--staging_dir", str(root / "staging")], job_log)
    try:
        pool_address = _wait_for(_pool_address(pool_log), pool, pool_log)
        job_port = _wait_for(_port_in(port_file), job_service, job_log)
        yield {"pool": pool_address, "job_service": f"localhost:{job_port}",
               "pool_log": str(pool_log)}
    finally:
        _stop(pool, signal.SIGINT)
        _stop(job_service, signal.SIGTERM)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """E2E_TEXTS plus enough short documents for several model batches."""
    path = tmp_path_factory.mktemp("portable_corpus") / "corpus.jsonl"
    texts = E2E_TEXTS + [f"第{i}篇文档，客服回复很及时。" for i in range(20)]
    path.write_text("".join(
        json.dumps({"id": f"doc-{i}", "text": t}, ensure_ascii=False) + "\n"
        for i, t in enumerate(texts)), encoding="utf-8")
    return path


def _run_job(corpus: Path, out: Path, model_dir: str,
             *runner_args: str) -> RunSummary:
    """``pipeline.run.run`` on the corpus with the tiny model."""
    return run(["--input", str(corpus), "--output", str(out),
                "--model", model_dir, "--max_seq_length", str(MAX_SEQ),
                "--batch_size", "3", "--precision", "float32", *runner_args])


@pytest.fixture(scope="module")
def direct(corpus, tmp_path_factory, tiny_model_dir):
    """The DirectRunner's summary and output for the corpus."""
    out = tmp_path_factory.mktemp("portable_direct") / "emb"
    summary = _run_job(corpus, out, tiny_model_dir, "--runner", "DirectRunner")
    return summary, load_embeddings(f"{out}-*-of-*.parquet")


@pytest.mark.parametrize("job_service", ["process", "embed"])
def test_portable_runner_matches_direct_runner(
        job_service, services, corpus, direct, tmp_path, tiny_model_dir):
    """Same rows, vectors and counts as the DirectRunner; the model was
    loaded once, in a worker process started by the pool."""
    endpoint = services["job_service"] if job_service == "process" else "embed"
    loads_here = model_load.load_count()
    out = tmp_path / "emb"
    summary = _run_job(corpus, out, tiny_model_dir,
                       "--runner", "PortableRunner",
                       "--job_endpoint", endpoint,
                       "--environment_type", "EXTERNAL",
                       "--environment_config", services["pool"])
    direct_summary, expected = direct
    got = load_embeddings(f"{out}-*-of-*.parquet")

    assert got.ids == expected.ids
    assert len(got.ids) == len(set(got.ids)) == \
        direct_summary.counts["documents_embedded"]
    np.testing.assert_array_equal(got.num_tokens, expected.num_tokens)
    np.testing.assert_array_equal(got.truncated, expected.truncated)
    np.testing.assert_allclose(got.pooled_output, expected.pooled_output,
                               atol=1e-5)
    for ours, theirs in zip(got.sequence_output, expected.sequence_output):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)

    assert summary.reconciled
    assert {k: summary.counts[k] for k in COUNTERS} == \
        {k: direct_summary.counts[k] for k in COUNTERS}
    # One load, and not in this process: inference ran in a pool worker.
    assert summary.model_loads == 1
    assert model_load.load_count() == loads_here
    assert "Starting worker with command" in \
        Path(services["pool_log"]).read_text(errors="replace")


# --- the launch check --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _failing_python(folder: Path) -> Path:
    """A folder whose ``python`` exits at once, as one without Beam does."""
    folder.mkdir()
    fake = folder / "python"
    fake.write_text("#!/bin/sh\necho 'No module named apache_beam' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    return folder


def test_which_jobs_the_launch_check_applies_to():
    from apache_beam.options.pipeline_options import PipelineOptions
    assert pool_address("EXTERNAL", "localhost:5") == "localhost:5"
    assert pool_address("external", '{"url": "h:1"}') == "h:1"
    assert pool_address("EXTERNAL", None,
                        ["x=1", "external_service_address=h:2"]) == "h:2"
    assert pool_address("DOCKER", "apache/beam_python3.11_sdk") is None
    assert all(is_local(a) for a in ("embed", "localhost:8099",
                                     "127.0.0.1:1", "[::1]:5", None))
    assert not is_local("jobs.example.com:8099")
    closed = f"localhost:{_free_port()}"

    def check(*flags: str, timeout: float = 0.5):
        return check_environment(PipelineOptions(list(flags)), timeout)

    pool = ("--environment_type", "EXTERNAL", "--environment_config", closed)
    with pytest.raises(WorkerPoolUnavailable, match="no SDK worker pool"):
        check("--runner", "PortableRunner", "--job_endpoint", "embed", *pool)
    # Not checked: no timeout, another environment, a job service elsewhere,
    # or a Flink/Spark cluster (whose machines reach their own pools).
    assert check("--runner", "PortableRunner", *pool, timeout=0) is None
    assert check("--runner", "PortableRunner", "--environment_type",
                 "LOOPBACK") is None
    assert check("--runner", "PortableRunner", "--job_endpoint",
                 "jobs.example.com:8099", *pool) is None
    assert check("--runner", "FlinkRunner", *pool) is None
    assert check("--runner", "DirectRunner") is None


def test_no_worker_pool_is_one_line_and_exit_2(corpus, tmp_path,
                                               tiny_model_dir):
    """Nothing listens at --environment_config: one line, exit 2, within the
    timeout, nothing written."""
    port = _free_port()
    out = tmp_path / "emb"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.run", "--input", str(corpus),
         "--output", str(out), "--model", tiny_model_dir,
         "--runner", "PortableRunner", "--job_endpoint", "embed",
         "--environment_type", "EXTERNAL",
         "--environment_config", f"localhost:{port}",
         "--worker_connect_timeout", "3"],
        cwd=ROOT, env=_service_env(), capture_output=True, text=True,
        timeout=300, check=False)
    lines = [line for line in (done.stdout + done.stderr).splitlines()
             if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert lines == [
        f"error: no SDK worker pool answers at localhost:{port} "
        "(--environment_config) within 3 s: start one (see docs/runners.md)"
        " or correct the address"]
    assert time.monotonic() - started < 120
    assert not list(tmp_path.glob("emb*"))


def test_a_pool_whose_python_cannot_run_a_worker_fails_in_time(tmp_path):
    """The README's old recipe: the pool answers, but the ``python`` on its
    PATH has no Beam, so no worker ever connects (Beam would wait
    forever)."""
    env = _service_env()
    env["PATH"] = os.pathsep.join([str(_failing_python(tmp_path / "bin")),
                                   "/usr/bin", "/bin"])
    log = tmp_path / "pool.log"
    pool = _start([sys.executable, "-c", _POOL_COMMAND], log, env)
    try:
        address = _wait_for(_pool_address(log), pool, log)
        started = time.monotonic()
        with pytest.raises(WorkerPoolUnavailable) as raised:
            check_worker_pool(address, 8)
        assert time.monotonic() - started < 30
    finally:
        _stop(pool, signal.SIGINT)
    assert str(raised.value) == (
        f"the worker pool at {address} started no SDK worker that connected "
        "within 8 s (--worker_connect_timeout): it starts workers as "
        "`python` from its own PATH, which must have apache-beam and this "
        "project; see docs/runners.md")
    assert "No module named apache_beam" in log.read_text(errors="replace")


def test_the_check_passes_with_a_working_pool(services):
    assert 0 < check_worker_pool(services["pool"], 60) < 60


def _readme_pool_command() -> str:
    """The documented command that starts the worker pool
    (docs/runners.md)."""
    text = (ROOT / "docs" / "runners.md").read_text(encoding="utf-8")
    section = text[text.index("# Runners"):]
    (line,) = [line for line in section.splitlines()
               if "worker_pool_main" in line and "--service_port" in line]
    return line


@pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "python").exists(),
                    reason="needs a virtual environment with bin/python")
def test_the_readme_recipe_starts_a_pool_that_works(tmp_path):
    """The recipe, run as written from a folder whose .venv is this
    interpreter's environment, with a ``python`` without Beam first on the
    PATH: its workers must still connect."""
    command = _readme_pool_command()
    assert command.endswith(" &") and "--service_port 50000" in command
    port = _free_port()
    command = command[:-2].replace("--service_port 50000",
                                   f"--service_port {port}")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    env = _service_env()
    env["PATH"] = os.pathsep.join([str(_failing_python(tmp_path / "bin")),
                                   "/usr/bin", "/bin"])
    env["PWD"] = str(tmp_path)
    log = tmp_path / "pool.log"
    pool = _start(["bash", "-c", command], log, env, cwd=tmp_path)
    try:
        assert check_worker_pool(f"localhost:{port}", 60) < 60
    finally:
        _stop(pool, signal.SIGINT)
    assert "Starting worker with command" in log.read_text(errors="replace")
