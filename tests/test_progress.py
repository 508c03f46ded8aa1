"""Progress: documents done (not merely read), the estimated total, the rate
and the ETA, on a fake clock; log lines, live lines and the DoFn's kinds."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from transforms import progress
from transforms.progress import (LIVE_INTERVAL, ProgressConfig,
                                 ProgressTracker, TrackProgress,
                                 format_duration, this_process)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _tracker(interval: float = 10, total_bytes=1000, **config):
    clock = _Clock()
    tracker = ProgressTracker(clock)
    tracker.configure(ProgressConfig("run-1", interval=interval,
                                     total_bytes=total_bytes, **config))
    return tracker, clock


def test_eta_comes_from_documents_done_not_documents_read():
    """A runner may read the whole input before the model gets to it: all
    100 documents read at once must not make the run look finished."""
    tracker, clock = _tracker()
    tracker.add(read=100, nbytes=1000)  # the whole input, read at once
    clock.now += 10
    line = tracker.add(embedded=25, tokens=2500)
    assert line == ("progress: 25 of ~100 documents done (25%; 25 embedded),"
                    " 100 read, 2.5 documents/s, 250 tokens/s, elapsed "
                    "0:00:10, ETA 0:00:30")
    snap = tracker.snapshot()
    assert snap.share == pytest.approx(0.25)
    assert snap.eta_seconds == pytest.approx(30.0)
    # Twice the rate later: the ETA follows the documents done.
    clock.now += 10
    line = tracker.add(embedded=50)
    assert "75 of ~100 documents done (75%" in line
    assert line.endswith("elapsed 0:00:20, ETA 0:00:07")


def test_no_eta_before_the_first_document_is_done():
    tracker, clock = _tracker()
    tracker.add(read=10, nbytes=100)
    clock.now += 10
    line = tracker.add(read=1, nbytes=10)
    assert "0 of ~100 documents done (0%; 0 embedded)" in line
    assert "ETA" not in line


def test_total_is_estimated_from_bytes_per_document_read():
    tracker, clock = _tracker(total_bytes=10_000)
    tracker.add(read=4, nbytes=100)  # 25 bytes a document: ~400 in all
    clock.now += 10
    line = tracker.add(embedded=4)
    assert "4 of ~400 documents done (1%; 4 embedded)" in line


def test_documents_done_without_the_model_count_as_done():
    """Duplicates, unchanged and blank documents are done when read; chunks
    count as their share of a document."""
    tracker, clock = _tracker(total_bytes=100)
    tracker.add(read=5, nbytes=50, finished=2)
    for _ in range(3):  # one document in three chunks
        tracker.add(embedded=1 / 3, tokens=10)
    clock.now += 10
    line = tracker.add(read=5, nbytes=50, finished=1)
    assert line.startswith(
        "progress: 4 of ~10 documents done (40%; 1 embedded), 10 read")


def test_no_total_or_eta_without_an_input_size():
    tracker, clock = _tracker(total_bytes=None)
    tracker.add(read=3, nbytes=99)
    clock.now += 10
    line = tracker.add(embedded=2)
    assert line.startswith("progress: 2 documents done (2 embedded), 3 read")
    assert "~" not in line and "ETA" not in line


def test_a_worker_process_reports_its_share_without_total_or_eta():
    """Only the launcher's process sees the whole run; a worker process
    (another host:pid) must not claim the whole input's total."""
    tracker, clock = _tracker(launcher="other-host:1")
    tracker.add(read=10, nbytes=100)
    clock.now += 10
    line = tracker.add(embedded=5)
    assert line.startswith("progress: 5 documents done (5 embedded), 10 read")
    assert "ETA" not in line
    assert ProgressConfig().launcher == this_process()


def test_lines_are_logged_every_interval(caplog):
    tracker, clock = _tracker(interval=10)
    caplog.set_level(logging.INFO, logger="transforms.progress")
    assert tracker.add(read=1, nbytes=10) is None  # not due yet
    clock.now += 10
    line = tracker.add(embedded=1)
    assert line and [r.getMessage() for r in caplog.records] == [line]
    clock.now += 5
    assert tracker.add(embedded=1) is None  # 5 s since the last line


def test_a_live_line_replaces_log_lines(caplog):
    tracker, clock = _tracker(interval=60)
    caplog.set_level(logging.INFO, logger="transforms.progress")
    shown: list[str] = []
    tracker.show_live(shown.append)
    tracker.add(read=10, nbytes=100)
    clock.now += LIVE_INTERVAL
    tracker.add(embedded=1)
    clock.now += LIVE_INTERVAL / 2
    tracker.add(embedded=1)  # too soon for a redraw
    clock.now += LIVE_INTERVAL / 2
    tracker.add(embedded=1)
    assert len(shown) == 2 and all(s.startswith("progress: ") for s in shown)
    assert "3 of ~" in shown[-1]
    assert not caplog.records
    tracker.show_live(None)
    clock.now += 60
    assert tracker.add(embedded=1) is not None and len(caplog.records) == 1


def test_a_new_run_starts_from_zero_and_zero_interval_is_silent():
    tracker, clock = _tracker(interval=1)
    tracker.add(read=5)
    tracker.configure(ProgressConfig("run-1", interval=1))  # same run
    assert tracker.read == 5
    tracker.configure(ProgressConfig("run-2", interval=0))
    assert tracker.read == 0
    clock.now += 1000
    assert tracker.add(read=1) is None


def test_the_dofn_feeds_each_kind(monkeypatch):
    tracker, _ = _tracker(interval=0)
    monkeypatch.setattr(progress, "TRACKER", tracker)
    config = ProgressConfig("run-1", interval=0)

    def feed(kind, *elements):
        dofn = TrackProgress(kind, config)
        dofn.setup()
        for element in elements:
            assert list(dofn.process(element)) == []

    feed("documents", SimpleNamespace(text="今天", nbytes=7),
         SimpleNamespace(text=" \t", nbytes=3))
    feed("done", SimpleNamespace(nbytes=5))
    feed("embeddings", SimpleNamespace(num_chunks=2, num_tokens=4),
         SimpleNamespace(num_chunks=1, num_tokens=6))
    assert (tracker.read, tracker.nbytes, tracker.tokens) == (3, 15, 10)
    # The blank document and the duplicate are done; 1.5 embedded.
    assert tracker.finished == 2 and tracker.embedded == pytest.approx(1.5)
    with pytest.raises(ValueError):
        TrackProgress("bytes", config)


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"
