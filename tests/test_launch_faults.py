"""Faults around a launch: unknown flags, runs where every document failed,
model calls that raise, and Ctrl-C.

Each fault must end in one clear line on stderr, the documented exit code,
and nothing published; bad records must be dead letters that name their
source and line with a bounded one-line reason.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import PredictionResult

from pipeline import analyze, finish
from pipeline.cli import (EXIT_INTERRUPTED, INTERRUPTED, UsageError,
                          check_known_flags, interrupts_deferred)
from pipeline.run import main, run
from pipeline.summary import collect_counts, most_common_reason
from tests.conftest import ROOT
from transforms.batch import BatchSettings
from transforms.infer import (REASON_CHARS, BertModelHandler, EmbedDocuments,
                              InferSettings, failure_reason)
from transforms.records import Document, DocumentEmbedding, TokenizedDocument
from transforms.tokenize import TokenizeDocuments, TokenizeSettings
from transforms.write import WriteDeadLetters


def _args(corpus: Path, out: Path, model_dir: str, *extra: str) -> list[str]:
    return ["--input", str(corpus), "--output", str(out), "--model",
            model_dir, "--max_seq_length", "32", "--xla", "off", *extra]


def _published(out: Path) -> list[str]:
    """Files under the output's final names (not in a staging dir)."""
    return sorted(p for p in glob.glob(f"{out}-*") if ".tmp-" not in p)


def _jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                            for r in records), encoding="utf-8")
    return path


# --- unknown flags ---------------------------------------------------------

@pytest.mark.parametrize("typo, suggestion", [
    (["--max_seq_lenght", "16"], "--max_seq_length"),
    (["--text_feild=body"], "--text_field"),
    (["--batchsize", "8"], "--batch_size"),
    (["--runer", "DirectRunner"], "--runner"),  # Beam's own flags too
])
def test_unknown_flag_is_a_usage_error_with_a_suggestion(
        tmp_path, tiny_model_dir, e2e_corpus, capsys, typo, suggestion):
    out = tmp_path / "emb"
    assert main(_args(e2e_corpus, out, tiny_model_dir, *typo)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: unknown flag {typo[0].split('=')[0]} "
                   f"(did you mean {suggestion}?); see --help"]
    assert not glob.glob(f"{out}*")  # refused before any work


def test_stray_value_is_a_usage_error(tmp_path, tiny_model_dir, e2e_corpus,
                                      capsys):
    """``--dedup`` takes no value: ``--dedup yes`` must not run without
    saying that ``yes`` went nowhere."""
    assert main(_args(e2e_corpus, tmp_path / "emb", tiny_model_dir,
                      "--dedup", "yes")) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: unexpected argument 'yes'")


def test_analyze_refuses_unknown_flags(e2e_corpus, capsys):
    assert analyze.main(["--input", str(e2e_corpus),
                         "--max_seq_lenght", "16"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "did you mean --max_seq_length?" in line


def test_beam_pipeline_options_still_pass():
    check_known_flags([
        "--runner", "DataflowRunner", "--project", "p-1", "--region",
        "europe-west4", "--temp_location", "gs://b/tmp",
        "--staging_location", "gs://b/staging", "--direct_num_workers", "2",
        "--direct_running_mode", "multi_processing",
        "--setup_file", "./setup.py", "--experiments", "a",
        "--experiments=b", "--sdk_container_image", "img:1",
        "--dataflow_service_options", "x=y", "--no_use_public_ips",
        "--machine_type", "n2-standard-8", "--max_num_workers=4",
        "--dry_run", "True", "--job_name", "j", "--save_main_session",
        "--input", "x", "--output", "y", "--max_seq_length", "16", "--dedup",
        "--num_buckets", "3"])  # pipeline.analyze's own flags are options too
    with pytest.raises(UsageError, match="did you mean --temp_location"):
        check_known_flags(["--temp_locaton", "gs://b/tmp"])


# --- runs where every document failed --------------------------------------

def test_run_where_every_document_failed_exits_3_and_publishes_nothing(
        tmp_path, tiny_model_dir, capsys):
    """A wrong --text_field makes every record a dead letter."""
    corpus = _jsonl(tmp_path / "c.jsonl", [
        {"id": f"d{i}", "body": "今天天气很好"} for i in range(6)]
        + [{"id": "n", "body": "很好", "text": 7}])
    out = tmp_path / "out" / "emb"
    assert main(_args(corpus, out, tiny_model_dir)) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: no document was embedded: 7 of 7 failed, most '
                   'often "missing text field \'text\'" (6)']
    assert _published(out) == []
    (staged,) = glob.glob(f"{out}.tmp-*")
    (manifest,) = glob.glob(f"{staged}/*-manifest.json")
    assert json.loads(Path(manifest).read_text())["status"] == "failed"


def test_empty_input_and_empty_documents_still_succeed(tmp_path,
                                                       tiny_model_dir):
    """Nothing embedded but nothing failed either: not a fault."""
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n", encoding="utf-8")
    for corpus in (empty, blank):
        out = tmp_path / corpus.stem / "emb"
        assert main(_args(corpus, out, tiny_model_dir)) == 0
        assert Path(f"{out}-manifest.json").exists()


def test_incremental_run_with_unchanged_documents_is_not_all_failed(
        tmp_path, tiny_model_dir):
    """A nightly run over an unchanged corpus plus one bad record embeds
    nothing new, but its index is current: it publishes (exit 0)."""
    rows = [{"id": f"d{i}", "text": f"今天天气很好{i}"} for i in range(4)]
    corpus = _jsonl(tmp_path / "c.jsonl", rows)
    first = tmp_path / "night1" / "emb"
    assert main(_args(corpus, first, tiny_model_dir)) == 0
    corpus = _jsonl(tmp_path / "c.jsonl", rows + [{"id": "bad", "text": 7}])
    second = tmp_path / "night2" / "emb"
    assert main(_args(corpus, second, tiny_model_dir)
                + ["--previous_index", f"{first}-manifest.json"]) == 0
    summary = json.loads(Path(f"{second}-summary.json").read_text())
    assert summary["counts"]["documents_unchanged"] == 4
    assert summary["counts"]["documents_failed"] == 1
    assert summary["counts"]["documents_embedded"] == 0


def test_most_common_reason_reads_a_bounded_sample(tmp_path):
    errors = [tmp_path / "e-00000-of-00002.jsonl",
              tmp_path / "e-00001-of-00002.jsonl"]
    _jsonl(errors[0], [{"reason": "malformed JSON: Expecting value: line 1"}]
           * 3 + [{"reason": "missing text field 'body'"}] * 2)
    _jsonl(errors[1], [{"reason": "malformed JSON: Unterminated string"}]
           * 4)
    paths = [str(p) for p in errors]
    common = most_common_reason(paths)
    assert (common.reason, common.count, common.sampled) == (
        "malformed JSON", 7, 9)
    common = most_common_reason(paths, limit=4)
    assert (common.reason, common.count, common.sampled) == (
        "malformed JSON", 3, 4)
    assert most_common_reason([]) is None


# --- model calls that raise ------------------------------------------------

class _NoModel:
    """Stands in for a loaded model (Beam's shared handle keeps a weak
    reference to it, so it must be an object that allows one)."""


class _FailingHandler(BertModelHandler):
    """A handler whose model call raises, with a long multi-line message as
    TensorFlow's errors have, for every batch holding a ``bad`` document."""

    def load_model(self) -> Any:
        return _NoModel()

    def run_inference(self, batch: Sequence[TokenizedDocument], model: Any,
                      inference_args: Optional[dict] = None) -> list:
        if any(doc.id.startswith("bad") for doc in batch):
            raise ValueError("the model call failed\n"
                             + "  details of the failure" * 200)
        return [PredictionResult(doc, DocumentEmbedding(
            doc.id, doc.num_tokens, doc.truncated,
            np.zeros(4, np.float32), None)) for doc in batch]


@pytest.fixture(scope="module")
def failed_batches(tmp_path_factory, small_vocab) -> tuple[list, dict]:
    """Tokenize and embed four documents, one per batch, with a model call
    that fails for the two ``bad`` ones: (dead letters, counts)."""
    out = tmp_path_factory.mktemp("failed_batches") / "out"
    long_text = "今天天气很好" * 10  # over 8 tokens: truncated
    docs = [Document("good-short", "很好", "a.jsonl", 1),
            Document("good-long", long_text, "a.jsonl", 2),
            Document("bad-short", "天气", "b.jsonl", 7),
            Document("bad-long", long_text, "b.jsonl", 9)]
    pipeline = beam.Pipeline(runner="DirectRunner")
    _, dead = (
        pipeline
        | beam.Create(docs)
        | beam.ParDo(TokenizeDocuments(small_vocab, True,
                                       TokenizeSettings(8)))
        | EmbedDocuments(_FailingHandler(InferSettings("unused",
                                                       ("pooled",))),
                         BatchSettings(batch_size=1,
                                       max_tokens_per_batch=64)))
    _ = dead | WriteDeadLetters(str(out))
    result = pipeline.run()
    result.wait_until_finish()
    counts, _ = collect_counts(result)
    errors = [json.loads(line) for path in glob.glob(f"{out}-*")
              for line in Path(path).read_text("utf-8").splitlines()]
    return errors, counts


def test_failed_model_calls_are_dead_letters_with_source_and_line(
        failed_batches):
    errors, counts = failed_batches
    assert sorted((e["id"], e["source"], e["line"]) for e in errors) == [
        ("bad-long", "b.jsonl", 9), ("bad-short", "b.jsonl", 7)]
    for error in errors:
        assert error["stage"] == "infer"
        assert error["reason"].startswith(
            "ValueError: the model call failed details of the failure")
        assert len(error["reason"]) <= REASON_CHARS
        assert "\n" not in error["reason"] and "Traceback" not in \
            error["reason"]
    assert (counts["documents_embedded"], counts["documents_failed"]) == \
        (2, 2)


def test_truncated_counts_only_documents_that_were_embedded(failed_batches):
    """Both long documents were truncated; only one was embedded."""
    _, counts = failed_batches
    assert counts["documents_truncated"] == 1


def test_failure_reason_of_beam_failure_tuples():
    import traceback

    class ModelError(RuntimeError):
        pass

    def beam_tuple(exn: BaseException) -> tuple:
        """What Beam's exception handling pairs with a failed element."""
        try:
            raise exn
        except BaseException as err:  # pylint: disable=broad-except
            return (type(err), repr(err),
                    traceback.format_exception(*sys.exc_info()))

    assert failure_reason(beam_tuple(ModelError("OOM\n  at node x"))) == \
        "ModelError: OOM at node x"
    assert failure_reason(beam_tuple(KeyError("k"))) == "KeyError: 'k'"
    assert failure_reason(beam_tuple(RuntimeError())) == "RuntimeError"
    assert failure_reason(ValueError("plain")) == "ValueError: plain"
    long = failure_reason(beam_tuple(ValueError("x" * 5000)))
    assert len(long) == REASON_CHARS and long.endswith("…")


# --- Ctrl-C ------------------------------------------------------------------

_NATIVE_LOG = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before "
                         r"absl::InitializeLog)|rebuild TensorFlow with")
_INFO_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ")


def _python_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's native start-up lines and our INFO log
    lines: what the run itself said."""
    return [line for line in stderr.splitlines()
            if line.strip() and not _NATIVE_LOG.search(line)
            and not _INFO_LOG.match(line)]


def _start_run(corpus: Path, out: Path, model_dir: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.run",
         *_args(corpus, out, model_dir, "--progress_interval", "0")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _wait_for(condition, process: subprocess.Popen, what: str,
              timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {what}: "
                        f"{process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _loading_beam(pid: int) -> bool:
    """Whether the process has begun loading Beam's compiled modules (the
    slow imports at start-up)."""
    with open(f"/proc/{pid}/maps", encoding="utf-8") as maps:
        return "apache_beam" in maps.read()


def _interrupt(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the run did not end after Ctrl-C")
    return process.returncode, err


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"),
                    reason="needs /proc to see the start-up imports")
def test_ctrl_c_at_start_up_is_one_line_and_130(tmp_path, tiny_model_dir,
                                                e2e_corpus):
    """Ctrl-C while Beam and TensorFlow are still being imported."""
    out = tmp_path / "emb"
    process = _start_run(e2e_corpus, out, tiny_model_dir)
    _wait_for(lambda: _loading_beam(process.pid), process, "start-up")
    code, err = _interrupt(process)
    assert code == EXIT_INTERRUPTED
    assert _python_lines(err) == [INTERRUPTED]
    assert not glob.glob(f"{out}*")


def test_ctrl_c_mid_run_is_one_line_130_and_publishes_nothing(
        tmp_path, tiny_model_dir):
    """Ctrl-C once the pipeline runs (its sinks have created the staging
    directory), on an input far too large to finish first."""
    corpus = tmp_path / "big.txt"
    corpus.write_text("".join(f"第{i}篇文档，今天天气很好，我们去公园散步。\n"
                              for i in range(100_000)), encoding="utf-8")
    out = tmp_path / "out" / "emb"
    process = _start_run(corpus, out, tiny_model_dir)
    _wait_for(lambda: glob.glob(f"{out}.tmp-*"), process,
              "the staging directory")
    code, err = _interrupt(process)
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert _python_lines(err) == [INTERRUPTED], err[-3000:]
    assert "Traceback" not in err
    assert _published(out) == []
    assert glob.glob(f"{out}.tmp-*")  # left for the next run to remove


def test_ctrl_c_while_publishing_is_held_back(tmp_path, tiny_model_dir,
                                              e2e_corpus, monkeypatch):
    """Publishing replaces the previous run's files: stopping half way
    would leave neither run.  The interrupt waits until it is done."""

    class Interrupted(Exception):
        pass

    def interrupted(signum, frame):
        raise Interrupted

    real_publish = finish.publish

    def publish_interrupted(*args: Any) -> list[str]:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs at the next bytecode
        return real_publish(*args)

    monkeypatch.setattr(finish, "publish", publish_interrupted)
    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        out = tmp_path / "emb"
        summary = run(_args(e2e_corpus, out, tiny_model_dir))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert summary.status == "succeeded"
    assert Path(f"{out}-manifest.json").exists()
    # Outside the publishing step the interrupt arrives as usual.
    with pytest.raises(Interrupted):
        signal.signal(signal.SIGINT, interrupted)
        try:
            with interrupts_deferred("a test"):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        finally:
            signal.signal(signal.SIGINT, previous)
