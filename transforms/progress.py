"""Progress of long runs: a periodic log line from each worker process.

Beam's counters are only read at the end of a run (or in the Dataflow UI),
so each worker process keeps its own ``ProgressTracker``: ``TrackProgress``
steps tell it about documents done (sent to the model, found unchanged or
duplicate) and tokens embedded, and every ``--progress_interval`` seconds
it logs one line: documents, tokens/s, elapsed time and, when the input's
size is known, the share of input bytes done and an ETA.

The figures are this process's.  With one worker process (the DirectRunner's
default) they describe the whole run; with several, each process logs its
own share and its ETA is an upper bound.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Iterator, Optional

import apache_beam as beam

_LOG = logging.getLogger("transforms.progress")


@dataclasses.dataclass(frozen=True)
class ProgressConfig:
    """What the trackers need: the run (to reset between runs in one
    process), the log interval in seconds (0: off) and the input size."""
    run_id: str = ""
    interval: float = 60.0
    total_bytes: Optional[int] = None


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1:02:05'``."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class ProgressTracker:
    """Counts of one worker process, and the log line they make."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._config = ProgressConfig(interval=0)
        self._reset()

    def _reset(self) -> None:
        self.documents = self.nbytes = self.embedded = self.tokens = 0
        self._started = self._last_log = self._clock()

    def configure(self, config: ProgressConfig) -> None:
        """Starts counting afresh when ``config`` is for another run."""
        with self._lock:
            if config.run_id != self._config.run_id:
                self._reset()
            self._config = config

    def add(self, documents: int = 0, nbytes: int = 0, embedded: int = 0,
            tokens: int = 0) -> Optional[str]:
        """Adds to the counts; returns (and logs) a line when one is due."""
        with self._lock:
            self.documents += documents
            self.nbytes += nbytes
            self.embedded += embedded
            self.tokens += tokens
            now = self._clock()
            interval = self._config.interval
            if not interval or now - self._last_log < interval:
                return None
            self._last_log = now
            line = self.line(now)
        _LOG.info(line)
        return line

    def line(self, now: float) -> str:
        """``progress: 1,200 documents (40% of input), 1,100 embedded, ...``"""
        elapsed = max(now - self._started, 1e-9)
        total = self._config.total_bytes
        share = ""
        eta = ""
        if total:
            done = min(self.nbytes / total, 1.0)
            share = f" ({done:.0%} of input)"
            if done > 0:
                eta = f", ETA {format_duration(elapsed * (1 - done) / done)}"
        return (f"progress: {self.documents:,} documents{share}, "
                f"{self.embedded:,} embedded, {self.tokens:,} tokens "
                f"({self.tokens / elapsed:,.0f} tokens/s), elapsed "
                f"{format_duration(elapsed)}{eta}")


# One tracker per worker process, shared by its threads.
TRACKER = ProgressTracker()


class TrackProgress(beam.DoFn):
    """Feeds the process's tracker; outputs nothing (apply it to a branch).

    ``kind`` is ``documents`` (elements with ``nbytes``: documents sent on,
    unchanged or duplicate) or ``embeddings`` (``DocumentEmbedding`` rows:
    documents embedded, on their first chunk, and tokens).
    """

    def __init__(self, kind: str, config: ProgressConfig):
        if kind not in ("documents", "embeddings"):
            raise ValueError(f"kind must be documents or embeddings: {kind}")
        self._kind = kind
        self._config = config

    def setup(self) -> None:
        TRACKER.configure(self._config)

    def process(self, element: Any) -> Iterator[Any]:
        if self._kind == "documents":
            TRACKER.add(documents=1, nbytes=element.nbytes)
        else:
            TRACKER.add(embedded=int(element.chunk_index == 0),
                        tokens=element.num_tokens)
        return iter(())
