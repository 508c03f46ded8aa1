"""Progress of long runs: documents in, per-process counts and an ETA out
(a log line every ``--progress_interval`` seconds, or a live line).

Beam's counters are only read at the end of a run (or in the Dataflow UI),
so each worker process keeps its own ``ProgressTracker``.  ``TrackProgress``
steps tell it about documents read (with the input bytes they took),
documents done without the model (empty, duplicate, unchanged: done at
once) and embeddings (documents embedded, tokens).  Its line says how many
documents are done, of about how many, at what rate, and when the rest will
be: the ETA comes from documents *done* (embedded or otherwise finished),
never from documents merely read, since a runner may read a whole input
long before the model gets to it.  The total is estimated from the input's
size in bytes (known before the run) and the bytes per document read so far.

A process's tracker logs its line every ``interval`` seconds; where the
launcher runs the pipeline in its own process with stderr on a terminal,
it shows the line live instead (``show_live``, see
``pipeline.cli.live_progress``).  The figures are the process's own: where
the pipeline runs in the launcher's process (the DirectRunner's default)
they describe the whole run, with the total and ETA; worker processes
(multi-process, portable or cluster runs) each log their own share:
counts and rates, no total or ETA, which their share cannot give.  Beam
metrics (``documents_embedded`` etc.) add up all workers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional

import apache_beam as beam

_LOG = logging.getLogger("transforms.progress")

# Seconds between redraws of a live line.
LIVE_INTERVAL = 1.0

KINDS = ("documents", "done", "embeddings")


def this_process() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass(frozen=True)
class ProgressConfig:
    """What the trackers need: the run (to reset between runs in one
    process), the log interval in seconds (0: off), the input size, and
    the process that built the graph (``launcher``, this one by default).

    Only a tracker in the launcher's process (a DirectRunner running the
    pipeline in process) sees the whole run, so only it estimates the
    total and an ETA; one of several worker processes sees its own share.
    """
    run_id: str = ""
    interval: float = 60.0
    total_bytes: Optional[int] = None
    launcher: str = dataclasses.field(default_factory=this_process)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1:02:05'``."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


@dataclasses.dataclass(frozen=True)
class Progress:
    """A snapshot of one process's counts and what follows from them.

    ``done`` counts documents embedded (a chunked document as the share of
    its chunks embedded) plus those done without the model; ``total`` is
    the estimated number of documents in the input (None when its size is
    unknown, e.g. compressed input).
    """
    read: int
    embedded: float
    done: float
    tokens: int
    elapsed: float
    total: Optional[int]

    @property
    def share(self) -> Optional[float]:
        """Share of the input's documents done, at most 1."""
        if not self.total:
            return None
        return min(self.done / self.total, 1.0)

    @property
    def documents_per_second(self) -> float:
        return self.embedded / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> Optional[float]:
        """Seconds until the estimated total is done, at the average rate
        of documents done so far; None before the first is done or without
        a total."""
        share = self.share
        if share is None or self.done <= 0 or self.elapsed <= 0:
            return None
        return self.elapsed * (1 - share) / share

    def line(self) -> str:
        """``progress: 1,100 of ~2,700 documents done (41%; 1,000
        embedded), 1,200 read, ...``"""
        done = f"{self.done:,.0f}"
        total = (f" of ~{self.total:,}" if self.total else "")
        share = self.share
        detail = f"{self.embedded:,.0f} embedded"
        if share is not None:
            detail = f"{share:.0%}; {detail}"
        eta = self.eta_seconds
        return (f"progress: {done}{total} documents done ({detail}), "
                f"{self.read:,} read, "
                f"{self.documents_per_second:,.1f} documents/s, "
                f"{self.tokens / max(self.elapsed, 1e-9):,.0f} tokens/s, "
                f"elapsed {format_duration(self.elapsed)}"
                + (f", ETA {format_duration(eta)}" if eta is not None
                   else ""))


class ProgressTracker:
    """Counts of one worker process, and the line they make."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._config = ProgressConfig(interval=0)
        self._live: Optional[Callable[[str], None]] = None
        self._reset()

    def _reset(self) -> None:
        self.read = self.nbytes = self.tokens = 0
        self.embedded = self.finished = 0.0
        self._started = self._last_log = self._last_live = self._clock()

    def configure(self, config: ProgressConfig) -> None:
        """Starts counting afresh when ``config`` is for another run."""
        with self._lock:
            if config.run_id != self._config.run_id:
                self._reset()
            self._config = config

    def show_live(self, display: Optional[Callable[[str], None]]) -> None:
        """Hands each line to ``display`` every ``LIVE_INTERVAL`` seconds
        instead of logging it every ``interval``; None goes back to logging.
        """
        with self._lock:
            self._live = display

    def add(self, read: int = 0, nbytes: int = 0, embedded: float = 0,
            finished: int = 0, tokens: int = 0) -> Optional[str]:
        """Adds to the counts: documents ``read`` (taking ``nbytes`` of
        input), documents ``embedded`` and ``finished`` without the model,
        ``tokens`` embedded.  Returns the line when one is due (logged, or
        shown live)."""
        with self._lock:
            self.read += read
            self.nbytes += nbytes
            self.embedded += embedded
            self.finished += finished
            self.tokens += tokens
            now = self._clock()
            interval = self._config.interval
            live = self._live
            if not interval:
                return None
            if live is not None:
                if now - self._last_live < LIVE_INTERVAL:
                    return None
                self._last_live = now
            elif now - self._last_log < interval:
                return None
            else:
                self._last_log = now
            line = self.snapshot(now).line()
        if live is not None:
            live(line)
        else:
            _LOG.info(line)
        return line

    def snapshot(self, now: Optional[float] = None) -> Progress:
        """The counts at ``now`` (the clock's time by default)."""
        now = self._clock() if now is None else now
        total = None
        whole_run = self._config.launcher == this_process()
        if whole_run and self._config.total_bytes and self.nbytes > 0:
            # Documents in the input ~ its bytes / bytes per document read.
            total = max(round(self._config.total_bytes * self.read
                              / self.nbytes), 1)
        return Progress(self.read, self.embedded,
                        self.embedded + self.finished, self.tokens,
                        max(now - self._started, 0.0), total)


# One tracker per worker process, shared by its threads.
TRACKER = ProgressTracker()


def is_blank(text: Optional[str]) -> bool:
    """Whether a document has nothing to embed (the tokenizer skips it as
    empty): close to, but cheaper than, tokenizing it."""
    return text is not None and not text.strip()


class TrackProgress(beam.DoFn):
    """Feeds the process's tracker; outputs nothing (apply it to a branch).

    ``kind`` is ``documents`` (documents on their way to the model, with
    ``nbytes``; a blank one is done at once, as the tokenizer skips it),
    ``done`` (documents done without the model, e.g. duplicates or
    unchanged ones, with ``nbytes``) or ``embeddings``
    (``DocumentEmbedding`` rows: each chunk counts as its share of a
    document, and its tokens).
    """

    def __init__(self, kind: str, config: ProgressConfig):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}: {kind}")
        self._kind = kind
        self._config = config

    def setup(self) -> None:
        TRACKER.configure(self._config)

    def process(self, element: Any) -> Iterator[Any]:
        if self._kind == "documents":
            blank = is_blank(getattr(element, "text", None))
            TRACKER.add(read=1, nbytes=element.nbytes, finished=int(blank))
        elif self._kind == "done":
            TRACKER.add(read=1, nbytes=element.nbytes, finished=1)
        else:
            TRACKER.add(embedded=1 / max(element.num_chunks, 1),
                        tokens=element.num_tokens)
        return iter(())
