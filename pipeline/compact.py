"""``python -m pipeline.compact --index <manifest or output prefix> --output
<prefix>``: the current dataset of an index as one Parquet dataset.

After incremental runs the current rows are spread over several runs'
files, beside rows that later runs replaced or deleted, and only a reader
that follows the manifest (``load_index``) can tell them apart.  A
compaction writes exactly the current rows, one per id of the index, to
``<output>-00000-of-00001.parquet`` (and, when the runs wrote document
vectors, ``<output>-documents-00000-of-00001.parquet``), so that any
Parquet reader can use them:

* the rows are what ``load_index(..., expand_duplicates=True)`` returns:
  the same walk over the manifest's segments and checks
  (``pipeline.read_embeddings.current_tables``), streamed a row group at a
  time into the output (memory holds the index and a row group, not the
  dataset); an id that ``--dedup`` did not embed comes with the vectors of
  the one embedded for its text, and every row has ``embedded_as`` (the id
  whose vectors these are: its own, or that one);
* the vectors are fixed-size lists (Polars: ``Array(Float32, H)``), the
  footer's ``bert_zh_embed`` key says what produced them (kind, model,
  fingerprint, tokenizer, pooling, the source run and this compaction), and
  ``<output>-duckdb.sql`` defines DuckDB views typing them ``FLOAT[H]``;
* rows are in segment and file order, not sorted.

It publishes the way a run does (``pipeline.publish``): it holds
``<output>.lock`` (``pipeline.lock``), writes under ``<output>.tmp-<id>/``
and renames into place, its manifest ``<output>-compact.json`` last; a
second compaction to the same output replaces the first.  Exit codes: 0
done (one line: ids, rows, files); 1 the files disagree with the index
(``DatasetError``) or writing failed, nothing published; 2 bad usage: a
missing, unreadable or failed manifest, or an ``--output`` that a run
writes to (its manifest, summary, index or dead letters are there) or that
the index reads from; 4 another process holds the output's lock; 130
Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Iterable, Optional, Sequence

from model.errors import one_line
from pipeline.cli import (UsageError, UsageParser, exit_on_interrupt,
                          interrupts_deferred, setup_logging)

if __name__ == "__main__":
    exit_on_interrupt()

# pylint: disable=wrong-import-position
from apache_beam.io.filesystems import FileSystems

from pipeline.finish import utc_now
from pipeline.lock import OutputLock, OutputLocked, OutputNotWritable
from pipeline.manifest import (ManifestError, index_counts, manifest_path,
                               same_path)
from pipeline.publish import (check_output_prefix, clean_stale, discard,
                              final_name, new_run_id, own_files, publish,
                              write_json)
from pipeline.read_embeddings import (DatasetError, current_tables,
                                      succeeded_manifest)
from pipeline.views import files_view, views_file, write_text
from transforms.embedding_files import (
    COMPACT_SUFFIX, DOCUMENTS, DOCUMENTS_SUFFIX, DUCKDB_SUFFIX, EMBEDDED_AS,
    EMBEDDINGS, ERRORS, INDEX, KINDS, PARQUET, PARQUET_EXT, SCHEMA_VERSION,
    SUMMARY_SUFFIX, embedding_schema, file_metadata, manifest_of,
    output_patterns, parquet_writer_options, shard_name, staging_dir,
    staging_prefix)
from transforms.write import PARQUET_CODECS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 4
COMPACT_VERSION = 1
# Bytes of rows gathered into one row group when --row_group_rows is 0.
_BYTES_PER_ROW_GROUP = 32 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class CompactJob:
    """What to compact, and where to."""
    index: str  # the manifest path or output prefix given
    output: str
    row_group_rows: int = 0  # 0: row groups of about 32 MiB
    compression: str = "none"

    @property
    def manifest(self) -> str:
        """The source manifest's path."""
        return manifest_of(self.index)


@dataclasses.dataclass
class Compacted:
    """A finished compaction."""
    run_id: str
    manifest: str  # <output>-compact.json
    rows: dict[str, int]
    files: dict[str, Any]
    ids: int
    mapped: int

    def line(self) -> str:
        """The one line printed at the end."""
        rows = ", ".join(f"{n:,} {kind} rows" for kind, n in
                         self.rows.items())
        return (f"compacted {self.ids:,} ids ({self.mapped:,} mapped to "
                f"another id's vectors): {rows}; manifest: {self.manifest}")


def compact_patterns(output: str) -> list[str]:
    """Every name a compaction at ``output`` publishes: a re-run replaces
    them."""
    patterns = output_patterns(output, PARQUET)
    return [patterns[EMBEDDINGS], patterns[DOCUMENTS],
            output + DUCKDB_SUFFIX, output + COMPACT_SUFFIX]


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m pipeline.compact``."""
    parser = UsageParser(prog="python -m pipeline.compact",
                         description="Write the current dataset of an index "
                                     "as one Parquet dataset.",
                         error_hint="; see --help")
    parser.add_argument("--index", required=True,
                        help="a run's manifest (.../emb-manifest.json) or "
                             "output prefix (.../emb)")
    parser.add_argument("--output", required=True,
                        help="output prefix of the compacted dataset")
    parser.add_argument("--row_group_rows", type=int, default=0,
                        help="rows per Parquet row group (default: about "
                             "32 MiB each)")
    parser.add_argument("--parquet_compression", default="none",
                        choices=PARQUET_CODECS)
    return parser


def parse_args(argv: Sequence[str]) -> CompactJob:
    """``CompactJob`` from the command line; ``UsageError`` otherwise."""
    args = build_parser().parse_args(list(argv))
    if args.row_group_rows < 0:
        raise UsageError("--row_group_rows must be >= 0")
    try:
        check_output_prefix(args.output)
    except ValueError as err:
        raise UsageError(str(err))
    return CompactJob(args.index, args.output, args.row_group_rows,
                      args.parquet_compression)


def source_manifest(job: CompactJob) -> dict[str, Any]:
    """The source run's manifest; ``UsageError`` when it is missing,
    unreadable or failed, or when ``job.output`` is one of the outputs it
    reads or a run's output."""
    path = job.manifest
    if not FileSystems.exists(path):
        raise UsageError(
            f"--index {job.index}: no manifest at {path} (the run did not "
            "finish, or it is not an output prefix of a run)")
    try:
        manifest = succeeded_manifest(path)
    except (ManifestError, ValueError) as err:
        raise UsageError(one_line(err))
    sources = {manifest["output"]} | {
        s["output"] for s in manifest["index"]["segments"]}
    if any(same_path(job.output, source) for source in sources):
        raise UsageError(f"--output {job.output} is an output this index "
                         "reads from; choose another prefix")
    run_files = own_files([output_patterns(job.output, PARQUET)[kind]
                           for kind in (INDEX, ERRORS)])
    for single in (manifest_path(job.output), job.output + SUMMARY_SUFFIX):
        if FileSystems.exists(single):
            run_files.append(single)
    if run_files:
        raise UsageError(
            f"--output {job.output} holds a run's files ({run_files[0]}): a "
            "compaction never replaces them; choose another prefix")
    return manifest


def _description(manifest: dict[str, Any], job: CompactJob,
                 run_id: str) -> dict[str, Any]:
    """The source run's description (a minimal one for manifests written
    before descriptions), with this compaction added."""
    layout = manifest.get("layout", {})
    description = dict(manifest.get("description") or {
        "schema_version": SCHEMA_VERSION,
        "model": {"fingerprint": manifest.get("model_fingerprint", ""),
                  "hidden_size": layout.get("hidden_size")}})
    description["compaction"] = {
        "run_id": run_id, "source_manifest": job.manifest,
        "source_run_id": manifest["run_id"],
        "rows": "one per id of the index (embedded_as: whose vectors)"}
    return description


def target_schema(manifest: dict[str, Any], kind: str,
                  first: Any) -> Any:
    """The compacted files' Arrow schema: what the runs wrote (from the
    manifest's layout, else from the ``first`` table read), vectors
    fixed-size, ``embedded_as`` after ``id``."""
    import pyarrow as pa
    layout = manifest.get("layout")
    if layout:
        hidden = layout["hidden_size"]
        if kind == DOCUMENTS:
            schema = embedding_schema(hidden, sequence=False)
        else:
            outputs = layout["outputs"]
            schema = embedding_schema(
                hidden, "pooled" in outputs, "sequence" in outputs,
                layout["chunked"], layout["write_text"],
                layout["sequence_dtype"])
    else:
        schema = first.schema.remove_metadata()
        if EMBEDDED_AS in schema.names:
            schema = schema.remove(schema.get_field_index(EMBEDDED_AS))
    return schema.insert(1, pa.field(EMBEDDED_AS, pa.string(),
                                     nullable=False))


def conform(table: Any, schema: Any) -> Any:
    """``table``'s columns as ``schema`` has them (types cast, a missing
    nullable column all null)."""
    import pyarrow as pa
    arrays = [table.column(field.name).cast(field.type)
              if field.name in table.column_names
              else pa.nulls(table.num_rows, field.type) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


class _RowGroups:
    """Writes tables to a Parquet file in row groups of ``rows`` rows (or
    of about 32 MiB when 0)."""

    def __init__(self, writer: Any, rows: int):
        self._writer = writer
        self._rows = rows
        self._buffer: list[Any] = []
        self._bytes = 0
        self.written = 0

    def add(self, table: Any) -> None:
        self._buffer.append(table)
        self._bytes += table.nbytes
        buffered = sum(t.num_rows for t in self._buffer)
        if self._rows and buffered >= self._rows:
            self._write(buffered - buffered % self._rows)
        elif not self._rows and self._bytes >= _BYTES_PER_ROW_GROUP:
            self._write(buffered)

    def _write(self, count: int) -> None:
        import pyarrow as pa
        table = pa.concat_tables(self._buffer)
        self._writer.write_table(table.slice(0, count),
                                 row_group_size=self._rows or count)
        self.written += count
        rest = table.slice(count)
        self._buffer = [rest] if rest.num_rows else []
        self._bytes = rest.nbytes

    def close(self) -> None:
        buffered = sum(t.num_rows for t in self._buffer)
        if buffered:
            self._write(buffered)


def write_kind(manifest: dict[str, Any], kind: str, path: str,
               description: dict[str, Any], job: CompactJob) -> Any:
    """Writes the current ``kind`` rows to ``path``; returns (rows written,
    the file's schema)."""
    import pyarrow.parquet as pq
    tables = current_tables(manifest, kind, expand_duplicates=True)
    first = next(tables)
    schema = target_schema(manifest, kind, first)
    schema = schema.with_metadata(file_metadata(description, schema, kind))
    with FileSystems.create(path) as handle:
        with pq.ParquetWriter(handle, schema, compression=job.compression,
                              **parquet_writer_options(schema)) as writer:
            groups = _RowGroups(writer, job.row_group_rows)
            for table in _chain(first, tables):
                groups.add(conform(table, schema))
            groups.close()
    return groups.written, schema


def _chain(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest


def _kind_prefix(prefix: str, kind: str) -> str:
    return prefix + (DOCUMENTS_SUFFIX if kind == DOCUMENTS else "")


def _stage(job: CompactJob, manifest: dict[str, Any], run_id: str,
           staged: str) -> tuple[Compacted, list[str], str]:
    """Writes the compacted files, views and manifest under ``staged``;
    returns the result and the staged paths (manifest last)."""
    description = _description(manifest, job, run_id)
    files: dict[str, Any] = {}
    rows: dict[str, int] = {}
    paths, views = [], []
    for kind in KINDS:
        if not any(s[kind] for s in manifest["index"]["segments"]):
            continue
        name = shard_name(0, 1) + PARQUET_EXT
        path = _kind_prefix(staged, kind) + name
        rows[kind], schema = write_kind(manifest, kind, path, description,
                                        job)
        final = final_name(path, staged, job.output)
        files[kind] = [final]
        paths.append(path)
        views.append(files_view(kind, [final], schema))
    if views:
        sql = staged + DUCKDB_SUFFIX
        write_text(views_file(f"compacted {manifest['run_id']} into "
                              f"{job.output}", views), sql)
        files["duckdb"] = final_name(sql, staged, job.output)
        paths.append(sql)
    index = index_counts(manifest["index"]["keys"])
    record = {
        "compact_version": COMPACT_VERSION, "status": "succeeded",
        "run_id": run_id, "created_at": utc_now(), "output": job.output,
        "source": {"manifest": job.manifest, "run_id": manifest["run_id"],
                   "output": manifest["output"],
                   "finished_at": manifest.get("finished_at")},
        "ids": index.entries, "duplicates_mapped": index.mapped,
        "rows": rows,
        "files": files, "description": description}
    compact_path = staged + COMPACT_SUFFIX
    write_json(record, compact_path)
    paths.append(compact_path)
    result = Compacted(run_id, final_name(compact_path, staged, job.output),
                       rows, files, index.entries, index.mapped)
    return result, paths, compact_path


def compact(job: CompactJob) -> Compacted:
    """Compacts ``job.index`` into ``job.output`` and publishes it.

    Raises ``UsageError`` (bad source or output), ``OutputLocked``,
    ``OutputNotWritable`` and ``DatasetError`` (nothing published).
    """
    manifest = source_manifest(job)
    run_id = new_run_id()
    with OutputLock(job.output, run_id) as lock:
        clean_stale(job.output, run_id)
        staged = staging_prefix(job.output, run_id)
        try:
            result, paths, compact_path = _stage(job, manifest, run_id,
                                                 staged)
            lock.check_held()
            with interrupts_deferred("publishing"):
                publish(paths, staged, job.output,
                        compact_patterns(job.output), compact_path)
        finally:
            discard(staging_dir(job.output, run_id))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: 0 done, 1 failed (nothing published), 2 bad usage, 4 locked."""
    args = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        result = compact(parse_args(args))
    except (UsageError, OutputNotWritable) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OutputLocked as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LOCKED
    except (DatasetError, OSError) as err:
        print(f"error: {one_line(err)}; nothing was published",
              file=sys.stderr)
        return EXIT_FAILED
    print(result.line())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
