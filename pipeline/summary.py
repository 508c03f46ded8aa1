"""The run summary: counts from Beam metrics, rates, and output files.

Every document read is accounted for exactly once:
``read = embedded + skipped_empty + duplicates + unchanged + failed``.  The
summary says whether the counts reconcile, prints a few lines for people and
is written as JSON for machines (``<output>-summary.json``).  When a run
fails for its dead letters, ``most_common_reason`` names their commonest
cause.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Optional, Sequence

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter

from transforms.dedup import ID_SAMPLE_SIZE
from transforms.records import METRICS_NAMESPACE

# The parts of documents_read: each document read ends in exactly one.
OUTCOMES = ("documents_embedded", "documents_skipped_empty",
            "documents_duplicates", "documents_unchanged", "documents_failed")

COUNTERS = ("documents_read",) + OUTCOMES + (
    "documents_truncated", "documents_new", "documents_changed",
    "documents_deleted", "bytes_read", "tokens_embedded", "tokens_computed",
    "documents_chunked", "chunks", "chunks_embedded", "chunks_failed",
    "documents_incomplete", "duplicate_ids")

# Dead letters read at most to name the most common failure reason: the
# launcher reads them from the staging directory after the run.
REASON_SAMPLE = 10_000

# RunInference records one model-load latency per load: its count is the
# number of model loads over all workers.
_LOAD_LATENCY_METRIC = "load_model_latency_milli_secs"


@dataclasses.dataclass
class RunSummary:
    """What a finished run did."""
    counts: dict[str, int]
    model_loads: int
    elapsed_seconds: float
    model_dir: str
    demo_model: bool
    outputs: dict[str, list[str]]
    run_id: str = ""
    model_fingerprint: str = ""
    previous_index: Optional[str] = None
    status: str = "succeeded"
    failure: Optional[str] = None
    duplicate_id_sample: list[str] = dataclasses.field(default_factory=list)

    @property
    def reconciled(self) -> bool:
        c = self.counts
        return c["documents_read"] == sum(c[k] for k in OUTCOMES)

    @property
    def error_rate(self) -> float:
        """Share of the documents read that failed."""
        read = self.counts["documents_read"]
        return self.counts["documents_failed"] / read if read else 0.0

    @property
    def padding_share(self) -> float:
        """Share of the tokens the model computed that were padding."""
        computed = self.counts["tokens_computed"]
        if not computed:
            return 0.0
        return 1 - self.counts["tokens_embedded"] / computed

    @property
    def documents_per_second(self) -> float:
        return self.counts["documents_embedded"] / max(self.elapsed_seconds,
                                                       1e-9)

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["reconciled"] = self.reconciled
        record["error_rate"] = round(self.error_rate, 6)
        record["documents_per_second"] = round(self.documents_per_second, 3)
        return record

    def _incremental_lines(self) -> list[str]:
        c = self.counts
        if self.previous_index is None:
            return []
        lines = [f"previous index:     {self.previous_index}",
                 f"  new: {c['documents_new']}, changed: "
                 f"{c['documents_changed']}, deleted since: "
                 f"{c['documents_deleted']}"]
        if c["documents_embedded"] == 0 and c["documents_unchanged"]:
            lines.append(f"no new embeddings: all {c['documents_unchanged']}"
                         " documents are unchanged")
        return lines

    def _duplicate_ids_note(self) -> str:
        """`` (N ids more than once, the last kept: a, b)`` or nothing."""
        count = self.counts["duplicate_ids"]
        if not count:
            return ""
        sample = ", ".join(self.duplicate_id_sample)
        return (f" ({count} ids more than once, the last kept"
                + (f": {sample})" if sample else ")"))

    def format(self) -> str:
        """A short human-readable report."""
        c = self.counts
        lines = [
            f"documents read:     {c['documents_read']}",
            f"  embedded:         {c['documents_embedded']} "
            f"({c['documents_truncated']} truncated)",
            f"  skipped (empty):  {c['documents_skipped_empty']}",
            f"  duplicates:       {c['documents_duplicates']}"
            + self._duplicate_ids_note(),
            f"  unchanged:        {c['documents_unchanged']}",
            f"  failed:           {c['documents_failed']}",
        ] + self._incremental_lines() + [
            f"tokens embedded:    {c['tokens_embedded']} "
            f"({self.padding_share:.0%} padding in model calls)",
        ]
        if c["chunks"]:
            lines.append(f"chunks:             {c['chunks_embedded']} "
                         f"embedded, {c['chunks_failed']} failed "
                         f"({c['documents_chunked']} documents chunked"
                         + (f", {c['documents_incomplete']} with a failed "
                            "chunk: left out of the index"
                            if c["documents_incomplete"] else "") + ")")
        lines += [
            f"time:               {self.elapsed_seconds:.1f} s, "
            f"{self.documents_per_second:.1f} documents/s",
            f"model:              {self.model_dir}"
            + (" (DEMO MODEL, RANDOM WEIGHTS)" if self.demo_model else "")
            + f", loaded {self.model_loads}x",
        ]
        for kind, files in self.outputs.items():
            if files or kind == "embeddings":
                lines.append(f"{kind + ':':<20}"
                             + (", ".join(files) or "none"))
        if not self.reconciled:
            lines.append("WARNING: counts do not add up: read != embedded + "
                         "skipped + duplicates + unchanged + failed")
        if self.failure:
            lines.append(f"RUN FAILED: {self.failure}")
        return "\n".join(lines)


def collect_counts(result: Any) -> tuple[dict[str, int], int]:
    """Our counters (summed over steps) and the number of model loads."""
    query = result.metrics().query(
        MetricsFilter().with_namespace(METRICS_NAMESPACE))
    counts = dict.fromkeys(COUNTERS, 0)
    for counter in query["counters"]:
        name = counter.key.metric.name
        if name in counts:
            counts[name] += int(_value(counter))
    loads = sum(int(_value(d).count) for d in query["distributions"]
                if d.key.metric.name.endswith(_LOAD_LATENCY_METRIC))
    return counts, loads


def duplicate_id_sample(result: Any) -> list[str]:
    """A few ids that occurred more than once (``transforms.dedup``),
    sorted."""
    query = result.metrics().query(
        MetricsFilter().with_namespace(METRICS_NAMESPACE)
        .with_name("duplicate_id_sample"))
    ids: set[str] = set()
    for metric in query.get("string_sets", []):
        ids.update(_value(metric) or ())
    return sorted(ids)[:ID_SAMPLE_SIZE]


def _value(metric: Any) -> Any:
    """Committed value where the runner reports it, else attempted."""
    committed = getattr(metric, "committed", None)
    return committed if committed is not None else metric.attempted


def list_outputs(patterns: dict[str, str]) -> dict[str, list[str]]:
    """The files each glob matches, sorted."""
    found = {}
    for kind, pattern in patterns.items():
        matches = FileSystems.match([pattern])[0].metadata_list
        found[kind] = sorted(m.path for m in matches)
    return found


def write_summary(summary: RunSummary, path: str) -> None:
    """Writes the summary as JSON to ``path`` (local or cloud)."""
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(summary.to_dict(), indent=2,
                                ensure_ascii=False).encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class CommonReason:
    """The most frequent kind of dead-letter reason among ``sampled`` dead
    letters, and how many of them had it."""
    reason: str
    count: int
    sampled: int


def reason_kind(reason: str) -> str:
    """A dead-letter reason without its details, so that equal causes
    count together: ``malformed JSON: Expecting value ...`` -> ``malformed
    JSON``, ``InvalidArgumentError: ...`` -> ``InvalidArgumentError``."""
    return reason.split(": ", 1)[0]


def most_common_reason(paths: Sequence[str], limit: int = REASON_SAMPLE
                       ) -> Optional[CommonReason]:
    """The most common reason kind in the dead-letter files ``paths``
    (``<output>-errors-*.jsonl``, local or cloud), from at most ``limit``
    dead letters; None when there are none.

    Read after the run rather than counted in the graph: Beam counters
    need names known in advance, and reasons are open-ended.
    """
    kinds: collections.Counter = collections.Counter()
    sampled = 0
    for path in sorted(paths):
        if sampled >= limit:
            break
        with FileSystems.open(path) as handle:
            for line in handle:
                if sampled >= limit:
                    break
                try:
                    kinds[reason_kind(str(json.loads(line)["reason"]))] += 1
                except (ValueError, KeyError, TypeError):
                    continue
                sampled += 1
    if not kinds:
        return None
    reason, count = kinds.most_common(1)[0]
    return CommonReason(reason, count, sampled)
