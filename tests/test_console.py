"""A quiet, honest console: a plain run prints its summary and little else;
``--verbose`` shows everything; ``--help`` shows every default.

The runs are real ``python -m pipeline.run`` processes on a small corpus
with the tiny model, with ``TF_CPP_MIN_LOG_LEVEL`` unset as on a user's
machine.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model import native_log
from pipeline import analyze, cli
from pipeline import run as run_module
from pipeline.options import embed_flags
from tests.conftest import ROOT

# What TensorFlow, XLA, absl and Beam print at start-up or while running
# that a user need not see (the brief's list, and what this machine shows).
NOISE = re.compile("|".join([
    r"Could not find cuda drivers", r"Unable to register cuDNN factory",
    r"Unable to register cu(FFT|BLAS) factory", r"cuInit", r"TF-TRT",
    r"oneDNN custom operations", r"Resource module is not available",
    r"assert_op", r"Ignoring Assert operator",
    r"Error parsing text-format tensorflow\.XlaSerializedCacheEntry",
    r"cpu_aot_loader", r"absl::InitializeLog", r"rebuild TensorFlow",
    r"cpu_feature_guard", r"XLA service .* initialized",
    r"Compiled cluster using XLA", r"MLIR crash reproducer",
    r"Discarding unparseable args", r"No iterator is returned",
    r"semi_persistent_directory", r"DeprecationWarning", r"UserWarning",
    r"^[IWEF]\d{4} ",  # any native log line
    r"^\d{4}-\d\d-\d\d \S+ (INFO|WARNING) (?!pipeline|model|transforms)",
]))
# Lines of the summary that every successful run prints (stdout).
SUMMARY_START = "documents read:"


def _env(**extra: str) -> dict[str, str]:
    """The user's environment: no TF_CPP_MIN_LOG_LEVEL, the project
    importable, the session's cache."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", native_log.QUIET_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _run_cli(corpus: Path, out: Path, model_dir: str,
             *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run", "--input", str(corpus),
         "--output", str(out), "--model", model_dir,
         "--max_seq_length", "32", "--batch_size", "4",
         "--engine", "tensorflow", "--precision", "float32", "--xla", "on",
         *extra],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
        check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A quiet run and a verbose one, both compiling with XLA."""
    root = tmp_path_factory.mktemp("console")
    corpus = root / "corpus.txt"
    corpus.write_text("今天天气很好，我们去公园散步。\n这家酒店的服务非常好。\n\n"
                      "手机电池续航一般，拍照效果不错。" * 4 + "\n"
                      "客服回复很及时，问题解决了。\n", encoding="utf-8")
    done = {}
    for name, extra in (("quiet", ()), ("verbose", ("--verbose",))):
        done[name] = _run_cli(corpus, root / name / "emb", tiny_model_dir,
                              *extra)
    return done


def _lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines()
            if line.strip()]


def test_a_plain_run_prints_the_summary_and_at_most_a_few_lines(runs):
    done = runs["quiet"]
    assert done.returncode == 0, done.stderr[-3000:]
    summary = [line for line in done.stdout.splitlines() if line.strip()]
    assert summary[0].startswith(SUMMARY_START)
    assert summary[-1].startswith("summary:")
    noise = [line for line in _lines(done) if NOISE.search(line)]
    assert noise == []
    assert len(_lines(done)) <= len(summary) + 3, done.stderr


def test_verbose_shows_the_rest_and_says_what_xla_did(runs):
    quiet, verbose = runs["quiet"], runs["verbose"]
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert len(_lines(verbose)) > len(_lines(quiet)) + 3
    assert "INFO model.load: Loaded BERT SavedModel" in verbose.stderr
    assert re.search(r"XLA compiled the model for input shape \[\d+, \d+\] "
                     r"\(first call", verbose.stderr)


def _read_terminal(master: int, process: subprocess.Popen) -> bytes:
    """Everything written to a pseudo-terminal until the process ends."""
    import select
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal's other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    return b"".join(chunks)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pty")
def test_a_terminal_gets_a_live_progress_line(tmp_path, tiny_model_dir):
    """stderr on a terminal: the progress line is drawn in place (carriage
    returns, no newline) and cleared before the run ends; stdout (the
    summary) is untouched."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"第{i}篇文档，客服回复很及时。\n"
                              for i in range(600)), encoding="utf-8")
    master, slave = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "--input", str(corpus),
         "--output", str(tmp_path / "emb"), "--model", tiny_model_dir,
         "--max_seq_length", "32", "--batch_size", "1", "--xla", "off",
         # The plain TensorFlow graph at batch 1 keeps the run over the
         # line's one-second redraw; a faster engine may finish before it.
         "--engine", "tensorflow", "--precision", "float32"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    try:
        terminal = _read_terminal(master, process).decode("utf-8", "replace")
        stdout = process.communicate(timeout=600)[0].decode("utf-8")
    finally:
        os.close(master)
    assert process.returncode == 0, terminal[-3000:]
    assert re.search(r"\rprogress: \d+ of ~\d{3} documents done \(\d+%; "
                     r"\d+ embedded\), \d+ read, .*documents/s.*\x1b\[K",
                     terminal)
    assert terminal.rstrip("\n").endswith("\r\x1b[K")  # cleared at the end
    assert not [line for line in terminal.replace("\r", "\n").splitlines()
                if NOISE.search(line)]
    assert stdout.startswith(SUMMARY_START) and "progress" not in stdout


def test_an_error_is_still_one_line_in_a_quiet_run(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.run", "--input",
         str(tmp_path / "missing-*.jsonl"), "--output", str(tmp_path / "e")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
        check=False)
    assert done.returncode == 2
    (line,) = _lines(done)
    assert line.startswith("error: ") and "missing-*.jsonl" in line


# --- the pieces ------------------------------------------------------------


def test_native_noise_is_recognised_and_nothing_else():
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called "
        "are written to STDERR",
        "I0000 00:00:1796048410.388893    4424 port.cc:153] oneDNN custom "
        "operations are on.",
        "W0000 00:00:1796048429.599969    4424 assert_op.cc:39] Ignoring "
        "Assert operator",
        "E0000 00:00:1796048420.020830    4424 cuda_platform.cc:52] failed "
        "call to cuInit: INTERNAL: CUDA error",
        "E0000 00:00:1.5 7 cuda_dnn.cc:8310] Unable to register cuDNN "
        "factory: Attempting to register factory for plugin cuDNN",
        "To enable the following instructions: AVX2 FMA, in other "
        "operations, rebuild TensorFlow with the appropriate compiler "
        "flags.",
    ]
    kept = [
        "E0000 00:00:1.5 7 op_kernel.cc:1830] OP_REQUIRES failed: out of "
        "memory",
        "F0000 00:00:1.5 7 check.cc:12] Check failed: x == y",
        "Traceback (most recent call last):",
        "error: the pipeline failed",
        "2026-11-30 14:20:19,978 WARNING model.load: XLA cannot compile",
    ]
    assert all(native_log.is_native_noise(line) for line in noise)
    assert not any(native_log.is_native_noise(line) for line in kept)
    text = "\n".join(noise + kept) + "\n"
    assert native_log.drop_native_noise(text) == "\n".join(kept) + "\n"


def test_descriptor_2_is_filtered_only_while_the_block_runs(capfd):
    noise = ("I0000 00:00:1.5 7 port.cc:153] oneDNN custom operations are "
             "on.\n")
    with native_log.native_stderr_filtered():
        os.write(2, noise.encode())
        os.write(2, "kept: 中文\n".encode())
    os.write(2, noise.encode())  # after the block: untouched
    assert capfd.readouterr().err == "kept: 中文\n" + noise


def test_a_failing_block_writes_back_everything(capfd):
    noise = "I0000 00:00:1.5 7 port.cc:153] oneDNN banner\n"
    with pytest.raises(ImportError):
        with native_log.native_stderr_filtered():
            os.write(2, noise.encode())
            raise ImportError("broken native library")
    assert capfd.readouterr().err == noise


def test_a_process_that_dies_in_the_block_loses_nothing(tmp_path):
    """A crash (here ``os._exit``, as a native abort or Ctrl-C would end
    the process) while descriptor 2 is filtered: every line still shows."""
    code = (
        "import os\n"
        "from model import native_log\n"
        "with native_log.native_stderr_filtered():\n"
        "    os.write(2, b'I0000 00:00:1.5 7 port.cc:153] oneDNN banner\\n')\n"
        "    os.write(2, b'F0000 00:00:1.5 7 check.cc:12] Check failed\\n')\n"
        "    os._exit(134)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          env=_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 134
    assert done.stderr.splitlines() == [
        "I0000 00:00:1.5 7 port.cc:153] oneDNN banner",
        "F0000 00:00:1.5 7 check.cc:12] Check failed"]


def test_the_first_import_of_a_module_runs_filtered(tmp_path, monkeypatch,
                                                    capfd):
    """The import hook wraps exactly the first import of the module (here
    a stand-in that writes native-looking lines to descriptor 2)."""
    (tmp_path / "fake_tf_for_test.py").write_text(
        "import os\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog"
        "() is called are written to STDERR\\n')\n"
        "os.write(2, b'I0000 00:00:1.5 7 cudart_stub.cc:31] Could not find "
        "cuda drivers on your machine\\n')\n"
        "os.write(2, b'something real\\n')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    finder = native_log._FirstImportFinder("fake_tf_for_test")
    monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
    import fake_tf_for_test  # noqa: F401  pylint: disable=import-error
    assert finder not in sys.meta_path
    assert capfd.readouterr().err == "something real\n"
    monkeypatch.delitem(sys.modules, "fake_tf_for_test")


def _record(name: str, level: int, msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def _relayed(severity: int, message: str, location: str) -> logging.LogRecord:
    from apache_beam.portability.api import beam_fn_api_pb2
    entry = beam_fn_api_pb2.LogEntry(severity=severity, message=message,
                                     log_location=location)
    return _record("apache_beam.runners.portability.local_job_service",
                   logging.INFO if severity < 5 else logging.WARNING,
                   "Worker: %s", str(entry).replace("\n", " "))


def test_the_console_filter_keeps_ours_and_hides_library_chatter():
    import transforms.progress  # noqa: F401  (the launcher has it)
    quiet, verbose = cli.ConsoleFilter(False), cli.ConsoleFilter(True)
    cases = [  # record, shown quiet, shown verbose
        (_record("apache_beam.options", logging.WARNING,
                 "Discarding unparseable args"), False, True),
        (_record("absl", logging.WARNING, "x"), False, True),
        (_record("tensorflow", logging.ERROR, "real error"), True, True),
        (_record("model.load", logging.INFO, "Loaded"), False, True),
        (_record("model.load", logging.WARNING, "XLA cannot"), True, True),
        (_record("transforms.progress", logging.INFO, "progress: 1"),
         True, True),
        (_record("apache_beam.runners", logging.INFO, "Running"),
         False, False),
    ]
    for record, in_quiet, in_verbose in cases:
        assert quiet.filter(record) is in_quiet, record.getMessage()
        assert verbose.filter(record) is in_verbose, record.getMessage()


def test_worker_lines_relayed_by_the_job_service_are_rewritten():
    quiet = cli.ConsoleFilter(False)
    import transforms.progress  # noqa: F401
    progress_line = _relayed(3, "progress: 5 documents done (5 embedded)",
                             "/srv/app/transforms/progress.py:93")
    assert quiet.filter(progress_line)
    assert progress_line.name == "transforms.progress"
    assert progress_line.getMessage() == \
        "worker: progress: 5 documents done (5 embedded)"
    beam_warning = _relayed(5, "Discarding unparseable args: ['--x']",
                            "/venv/apache_beam/options/pipeline_options.py:1")
    assert not quiet.filter(beam_warning)
    # A library module that shares our package names is not ours.
    namesake = _relayed(5, "x", "/venv/apache_beam/transforms/core.py:7")
    assert cli.relayed_worker_line(namesake.args[0])[1] == "worker"
    assert cli.ConsoleFilter(True).filter(_relayed(
        5, "Discarding", "/venv/apache_beam/options/pipeline_options.py:1"))


def test_a_live_line_on_a_terminal_and_log_lines_above_it(monkeypatch):
    """On a terminal the launcher's progress is one line rewritten in place
    and cleared at the end; a log record is written above it."""
    from transforms import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock = [0.0]
    tracker = progress.ProgressTracker(lambda: clock[0])
    tracker.configure(progress.ProgressConfig("live", interval=60,
                                              total_bytes=100))
    monkeypatch.setattr(progress, "TRACKER", tracker)
    terminal = Terminal()
    status = cli.StatusLine(terminal)
    monkeypatch.setattr(cli, "STATUS", status)
    handler = cli.ConsoleHandler(terminal)
    with cli.live_progress(60, terminal) as live:
        assert live
        tracker.add(read=10, nbytes=100)
        clock[0] += progress.LIVE_INTERVAL
        tracker.add(embedded=4)
        handler.emit(_record("model.load", logging.WARNING, "a warning"))
        clock[0] += progress.LIVE_INTERVAL
        tracker.add(embedded=1)
    text = terminal.getvalue()
    assert text.count("\rprogress: ") == 3  # 2 lines + 1 redraw after log
    assert "\r\x1b[Ka warning\n\rprogress: 4 of ~10" in text
    assert text.endswith("\r\x1b[K")  # cleared before the summary
    # Not a terminal (a file, a pipe, CI): no live line.
    with cli.live_progress(60, io.StringIO()) as live:
        assert not live
    with cli.live_progress(0, terminal) as live:
        assert not live


# --- --help ------------------------------------------------------------------


def _help_blocks(text: str) -> dict[str, str]:
    """Each flag's help in ``--help`` output, whitespace-normalized."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (--\w+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(block.split()) for flag, block in blocks.items()}


def _assert_defaults_shown(blocks: dict[str, str], actions) -> None:
    for name, action in actions:
        block = blocks[f"--{name}"]
        if action.default is None:
            assert cli.STATES_DEFAULT.search(block), block
        else:
            shown = cli.help_default(action.default).replace("%%", "%")
            assert re.search(r"default:? " + re.escape(shown), block,
                             re.I), block


def test_every_run_flag_shows_its_default_in_help(capsys):
    run_module.print_help()
    blocks = _help_blocks(capsys.readouterr().out)
    flags = embed_flags()
    assert set(flags) <= {flag[2:] for flag in blocks}
    _assert_defaults_shown(blocks, flags.items())
    assert "(default: 128)" in blocks["--max_seq_length"]
    assert "(default: 2048)" in blocks["--max_tokens_per_batch"]
    assert "(default: off)" in blocks["--dedup"]


def test_every_analyze_flag_shows_its_default_in_help(capsys):
    import argparse
    analyze.print_help()
    blocks = _help_blocks(capsys.readouterr().out)
    parser = argparse.ArgumentParser(add_help=False)
    analyze.AnalyzeOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    ours = [(a.option_strings[0][2:], a) for a in parser._actions]  # pylint: disable=protected-access
    shared = [(name, action) for name, action in embed_flags().items()
              if name in analyze._SHARED_FLAGS]  # pylint: disable=protected-access
    _assert_defaults_shown(blocks, ours + shared)
    assert {"--plot", "--verbose", "--num_buckets"} <= set(blocks)
