"""After the pipeline: check the run, then publish it or keep it as failed.

A run that completed is published only when its counts reconcile and its
error rate is within ``--max_error_rate``; then its staged files, summary
and manifest (last) are renamed to their final names (``pipeline.publish``).
Otherwise the summary and a manifest saying ``failed`` are written into the
staging directory, which stays for inspection, and nothing is published.
The same happens when the staged files do not hold what the counts say
(``staged_mismatch``: e.g. documents embedded but no embedding file staged),
and publishing stops before it removes anything when the run no longer
holds the output's lock (``pipeline.lock``).

Besides its files, a run publishes what describes them:
``<output>-schema.json`` (``pipeline.manifest.schema_document``; TFRecord
files have no footer for it) and, for Parquet, ``<output>-duckdb.sql``
(``pipeline.views``), both listed in the manifest.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Optional, Sequence

from pipeline.graph import JobConfig
from pipeline.lock import LockLost, OutputLock
from pipeline.manifest import (FAILED, PreviousIndex, index_counts,
                               index_segments, output_schemas, run_manifest,
                               schema_document)
from pipeline.publish import discard, final_name, publish, write_json
from pipeline.summary import RunSummary, list_outputs, write_summary
from pipeline.views import indexed_view, views_file, write_text
from transforms.embedding_files import (
    COMPACT_SUFFIX, DOCUMENTS, DUCKDB_SUFFIX, EMBEDDINGS, INDEX,
    MANIFEST_SUFFIX, PARQUET, SCHEMA_SUFFIX, SUMMARY_SUFFIX, output_patterns,
    output_regex, staging_dir)
from transforms.write import FORMATS, TFRECORD_COMPRESSIONS


class RunFailed(RuntimeError):
    """The pipeline raised (nothing was published) or publishing broke off
    (no manifest: the output is not a complete run)."""


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")


def failure_of(summary: RunSummary, max_error_rate: Optional[float]
               ) -> Optional[str]:
    """Why a run that completed must not be published, or None."""
    if not summary.reconciled:
        return ("counts do not add up: read != embedded + skipped + "
                "duplicates + unchanged + failed")
    if max_error_rate is not None and summary.error_rate > max_error_rate:
        return (f"error rate {summary.error_rate:.2%} "
                f"({summary.counts['documents_failed']} of "
                f"{summary.counts['documents_read']} documents failed) "
                f"exceeds --max_error_rate {max_error_rate:.2%}")
    return None


def all_output_patterns(output: str) -> list[str]:
    """Every file name a run at ``output`` may have published, whatever its
    format, so that a re-run replaces all of them (a compaction's manifest
    too: ``pipeline.compact`` shares the shard names)."""
    patterns = {p for fmt in FORMATS for compression in TFRECORD_COMPRESSIONS
                for p in output_patterns(output, fmt, compression).values()}
    return sorted(patterns) + [output + suffix for suffix in (
        SUMMARY_SUFFIX, SCHEMA_SUFFIX, DUCKDB_SUFFIX, COMPACT_SUFFIX)]


def parquet_rows(files: Sequence[str]) -> int:
    """Rows of Parquet files, from their footers (no data is read)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    rows = 0
    for path in files:
        with FileSystems.open(path) as handle:
            rows += pq.ParquetFile(handle).metadata.num_rows
    return rows


def staged_mismatch(staged: dict[str, list[str]], counts: dict[str, int],
                    config: JobConfig) -> Optional[str]:
    """Why the staged files cannot be what the counts say, or None.

    Embedding rows are ``chunks_embedded`` (one per document unchunked);
    Parquet files tell their row counts from their footers.  The index of
    an unchunked run holds the embedded and the unchanged documents, and
    the ``--dedup`` duplicates it maps to them (at most the duplicates).
    """
    rows = counts["chunks_embedded"]
    if rows and not staged[EMBEDDINGS]:
        return (f"{rows} rows were embedded but no embedding file was "
                "staged (the staging directory was removed?)")
    if config.output_format == PARQUET:
        found = parquet_rows(staged[EMBEDDINGS])
        if found != rows:
            return (f"the staged embedding files hold {found} rows, the "
                    f"counts say {rows}")
    index = index_counts(staged[INDEX])
    if index.mapped > counts["documents_duplicates"]:
        return (f"the staged index maps {index.mapped} ids to other "
                f"documents' rows, more than the "
                f"{counts['documents_duplicates']} duplicates")
    if not config.chunked:
        entries = counts["documents_embedded"] + counts["documents_unchanged"]
        if index.own != entries:
            return (f"the staged index holds {index.own} entries with rows "
                    f"of their own, the counts say {entries} (embedded + "
                    "unchanged)")
    return None


@dataclasses.dataclass
class StagedRun:
    """A run whose pipeline wrote under ``staged_prefix``."""
    config: JobConfig  # with the final output prefix
    previous: Optional[PreviousIndex]
    started_at: str
    staged_prefix: str
    lock: Optional[OutputLock] = None  # checked before publishing

    @property
    def staging_dir(self) -> str:
        return staging_dir(self.config.output, self.config.run_id)

    def staged_outputs(self) -> dict[str, list[str]]:
        """The staged files, by kind (``embedding_files.output_patterns``,
        names of exactly that form)."""
        patterns = output_patterns(self.staged_prefix,
                                   self.config.output_format,
                                   self.config.write.tfrecord_compression)
        return {kind: [p for p in paths
                       if output_regex(patterns[kind]).fullmatch(p)]
                for kind, paths in list_outputs(patterns).items()}

    def final(self, paths: list[str]) -> list[str]:
        """The published names of staged files."""
        return [final_name(p, self.staged_prefix, self.config.output)
                for p in paths]

    def _manifest(self, summary: RunSummary, files: dict[str, Any],
                  index: Optional[dict[str, Any]]) -> dict[str, Any]:
        return run_manifest(self.config, summary, self.started_at,
                            utc_now(), files, self.previous, index)

    def keep_failed(self, summary: RunSummary) -> str:
        """Writes the summary and a failed manifest into the staging
        directory and returns the summary's path; publishes nothing."""
        summary.status = FAILED
        summary.outputs = self.staged_outputs()
        summary_path = self.staged_prefix + SUMMARY_SUFFIX
        write_summary(summary, summary_path)
        write_json(self._manifest(summary, summary.outputs, None),
                   self.staged_prefix + MANIFEST_SUFFIX)
        return summary_path

    def _index(self, staged: dict[str, list[str]]) -> dict[str, Any]:
        """The manifest's index: this run's entries and the segments (runs
        whose files still hold live rows)."""
        counts = index_counts(staged[INDEX])
        own = {"run_id": self.config.run_id, "output": self.config.output,
               "format": self.config.output_format,
               EMBEDDINGS: self.final(staged[EMBEDDINGS]),
               DOCUMENTS: self.final(staged[DOCUMENTS])}
        return {"documents": counts.entries,
                "duplicates_mapped": counts.mapped,
                "keys": self.final(staged[INDEX]),
                "segments": index_segments(own, self.previous, counts.runs)}

    def _describe(self, files: dict[str, Any], index: dict[str, Any]
                  ) -> list[str]:
        """Stages ``<output>-schema.json`` and, for Parquet, the DuckDB
        views of the current dataset (when it has rows); adds their final
        names to ``files`` and returns the staged paths."""
        schema_path = self.staged_prefix + SCHEMA_SUFFIX
        write_json(schema_document(self.config, files), schema_path)
        staged = [schema_path]
        views = []
        if self.config.output_format == PARQUET:
            for kind, schema in output_schemas(self.config).items():
                segments = [(s["run_id"], s[kind])
                            for s in index["segments"] if s[kind]]
                if segments:
                    views.append(indexed_view(kind, segments, index["keys"],
                                              schema))
        if views:
            sql_path = self.staged_prefix + DUCKDB_SUFFIX
            write_text(views_file(f"run {self.config.run_id}: "
                                  f"{self.config.output}", views), sql_path)
            staged.append(sql_path)
        for path in staged:
            key = "duckdb" if path.endswith(DUCKDB_SUFFIX) else "schema"
            files[key] = self.final([path])[0]
        return staged

    def publish(self, summary: RunSummary) -> tuple[str, str]:
        """Publishes the staged files, the summary and the manifest (last);
        returns the final summary and manifest paths.

        Raises ``RunFailed``, with nothing published, when the staged
        files do not match the counts or the lock was lost, and when
        renaming breaks off.
        """
        staged = self.staged_outputs()
        mismatch = staged_mismatch(staged, summary.counts, self.config)
        if mismatch:
            summary.failure = mismatch
            try:
                self.keep_failed(summary)
            except Exception:  # pylint: disable=broad-except
                pass  # the staging directory may be gone: say why below
            raise RunFailed(f"{mismatch}; nothing was published; staged "
                            f"files: {self.staging_dir}")
        if self.lock is not None:
            try:
                self.lock.check_held()
            except LockLost as err:
                raise RunFailed(f"not publishing: this run lost the lock "
                                f"on its output ({err})") from err
        summary.outputs = {k: self.final(v) for k, v in staged.items()}
        summary_path = self.staged_prefix + SUMMARY_SUFFIX
        manifest_path = self.staged_prefix + MANIFEST_SUFFIX
        files: dict[str, Any] = dict(summary.outputs)
        files["summary"] = self.final([summary_path])[0]
        index = self._index(staged)
        described = self._describe(files, index)
        write_summary(summary, summary_path)
        write_json(self._manifest(summary, files, index), manifest_path)
        every = [p for paths in staged.values() for p in paths] + described
        try:
            final = publish(every + [summary_path, manifest_path],
                            self.staged_prefix, self.config.output,
                            all_output_patterns(self.config.output),
                            manifest_path)
        except Exception as err:
            raise RunFailed(
                f"publishing failed ({type(err).__name__}: {err}): "
                f"{self.config.output} has no manifest, so it is not a "
                "complete run; run the job again") from err
        discard(self.staging_dir)
        return final[-2], final[-1]
