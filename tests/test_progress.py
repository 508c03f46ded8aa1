"""The periodic progress line: counts, tokens/s, input share and ETA."""

from __future__ import annotations

from transforms.progress import (ProgressConfig, ProgressTracker,
                                 format_duration)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_line_every_interval_with_share_and_eta():
    clock = _Clock()
    tracker = ProgressTracker(clock)
    tracker.configure(ProgressConfig("run-1", interval=10,
                                     total_bytes=1000))
    assert tracker.add(documents=1, nbytes=250) is None  # not due yet
    clock.now += 10
    line = tracker.add(documents=1, nbytes=250, embedded=2, tokens=500)
    assert line == ("progress: 2 documents (50% of input), 2 embedded, "
                    "500 tokens (50 tokens/s), elapsed 0:00:10, "
                    "ETA 0:00:10")
    clock.now += 5
    assert tracker.add(tokens=1) is None  # 5 s since the last line


def test_no_share_or_eta_when_the_input_size_is_unknown():
    clock = _Clock()
    tracker = ProgressTracker(clock)
    tracker.configure(ProgressConfig("run-1", interval=1, total_bytes=None))
    clock.now += 2
    line = tracker.add(documents=3, nbytes=99)
    assert line.startswith("progress: 3 documents, 0 embedded")
    assert "ETA" not in line and "of input" not in line


def test_a_new_run_starts_from_zero_and_zero_interval_is_silent():
    clock = _Clock()
    tracker = ProgressTracker(clock)
    tracker.configure(ProgressConfig("run-1", interval=1))
    tracker.add(documents=5)
    tracker.configure(ProgressConfig("run-1", interval=1))  # same run
    assert tracker.documents == 5
    tracker.configure(ProgressConfig("run-2", interval=0))
    assert tracker.documents == 0
    clock.now += 1000
    assert tracker.add(documents=1) is None


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"
