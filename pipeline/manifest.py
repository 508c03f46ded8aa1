"""Run manifests and the index they describe.

Every run writes ``<output>-manifest.json`` last (see ``pipeline.publish``):
its run id, start and end time, options, model fingerprint, counts and
files, and the **index**: the files that together hold the current dataset.
An incremental run writes only new and changed rows, so the dataset after
run N is spread over run N's files and earlier runs' files; the manifest
lists them as *segments* (one per run that still holds live rows) and the
index entries (``<output>-index/part-*.parquet``: id, content hash, model
fingerprint, run id) say which run holds each document's rows.
``pipeline.read_embeddings.load_index`` reads the dataset back that way.

``--previous_index`` names the manifest of the run to build on: a manifest
path, an output prefix (its ``-manifest.json``), or a glob of manifests, of
which the newest successful one is taken (``out/news/*/emb-manifest.json``
in a nightly schedule: a failed night is skipped, a first run finds none).

``dataset_description`` is what every output says about itself (Parquet
footers, ``<output>-schema.json``, the manifest): model path and
fingerprint, vocabulary hash, tokenizer settings, pooling, precision.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional, Sequence

from apache_beam.io.filesystems import FileSystems

from transforms.embedding_files import (
    DOCUMENTS, EMBEDDED_AS, EMBEDDINGS, ID, INDEX, INDEX_MEANINGS,
    MANIFEST_SUFFIX, METADATA_KEY, RUN_ID, SCHEMA_VERSION, TFRECORD,
    embedding_schema, file_metadata, manifest_of, tfrecord_features)

_LOG = logging.getLogger("pipeline.manifest")

MANIFEST_VERSION = 1
SUCCEEDED = "succeeded"
FAILED = "failed"
_GLOB_CHARS = "*?["


class ManifestError(ValueError):
    """A manifest is missing, unreadable, failed, or does not fit."""


def manifest_path(output: str) -> str:
    """Where the run with output prefix ``output`` writes its manifest."""
    return output + MANIFEST_SUFFIX


def same_path(a: str, b: str) -> bool:
    """Whether two paths name the same file (local ones compared absolute,
    so ``out/x`` and ``/work/out/x`` match)."""
    if "://" in a or "://" in b:
        return a == b
    return os.path.abspath(a) == os.path.abspath(b)


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest at ``path``; ``ManifestError`` if it is not one."""
    try:
        with FileSystems.open(path) as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: not a readable run manifest "
                            f"({type(err).__name__}: {err})") from err
    if not isinstance(manifest, dict) or \
            manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: not a version-{MANIFEST_VERSION} run "
                            "manifest")
    return manifest


def _newest_succeeded(paths: Sequence[str]) -> Optional[str]:
    """The manifest among ``paths`` that finished last and succeeded."""
    best: Optional[tuple[str, str]] = None
    for path in paths:
        try:
            manifest = read_manifest(path)
        except ManifestError as err:
            _LOG.warning("Skipping %s", err)
            continue
        if manifest.get("status") != SUCCEEDED:
            continue
        key = (manifest.get("finished_at", ""), path)
        if best is None or key > best:
            best = key
    return best[1] if best else None


def find_previous(spec: str, own_output: str) -> Optional[str]:
    """The manifest path ``--previous_index`` names, or None when a glob
    matches no successful run yet (a first scheduled run).

    The run's own manifest (``own_output``) is never its previous index.
    Raises ``ManifestError`` for an explicit path that has no manifest.
    """
    own = manifest_path(own_output)
    if any(c in spec for c in _GLOB_CHARS):
        matched = [m.path for m in FileSystems.match([spec])[0].metadata_list
                   if m.path.endswith(MANIFEST_SUFFIX)
                   and not same_path(m.path, own)]
        found = _newest_succeeded(matched)
        if found is None:
            _LOG.warning("--previous_index %s: no successful run yet; "
                         "embedding everything", spec)
        return found
    path = manifest_of(spec)
    if not FileSystems.exists(path):
        raise ManifestError(
            f"--previous_index {spec}: no manifest at {path} (the run did "
            "not finish, or it is not an output prefix of this job)")
    return path


@dataclasses.dataclass(frozen=True)
class PreviousIndex:
    """What a run takes from the previous run's manifest."""
    manifest: str
    run_id: str
    index_files: list[str]
    segments: list[dict[str, Any]]
    reuse: bool  # False: written with another layout, so nothing is kept


def load_previous(path: str, output: str,
                  layout: dict[str, Any]) -> PreviousIndex:
    """Checks the previous manifest and takes its index from it.

    Raises ``ManifestError`` when that run failed or when its index holds
    files under ``output`` (publishing this run would replace them).
    """
    manifest = read_manifest(path)
    if manifest.get("status") != SUCCEEDED:
        raise ManifestError(f"--previous_index {path}: that run "
                            f"{manifest.get('status', 'did not succeed')}")
    index = manifest["index"]
    outputs = {s["output"] for s in index["segments"]} | {manifest["output"]}
    if any(same_path(output, other) for other in outputs):
        raise ManifestError(
            f"--previous_index {path} holds files under --output {output}, "
            "which this run would replace: give each run its own output "
            "prefix (e.g. a dated directory)")
    reuse = manifest.get("layout") == layout
    if not reuse:
        _LOG.warning("--previous_index %s was written with another output "
                     "layout (%s); every document is embedded again", path,
                     manifest.get("layout"))
    return PreviousIndex(path, manifest["run_id"], list(index["keys"]),
                         list(index["segments"]), reuse)


def dataset_description(config: Any) -> dict[str, Any]:
    """What produced a run's vectors (``config`` a ``JobConfig``), for the
    files' self-description."""
    tokens, infer = config.tokenize, config.infer
    return {
        "schema_version": SCHEMA_VERSION,
        "producer": "bert-zh-embed",
        "run_id": config.run_id,
        "model": {"path": infer.model_dir,
                  "fingerprint": config.model_fingerprint,
                  "hidden_size": config.hidden_size},
        "tokenizer": {"vocab_sha256": config.vocab_sha256,
                      "vocab_size": len(config.vocab),
                      "do_lower_case": bool(config.do_lower_case),
                      "max_seq_length": tokens.max_seq_length,
                      "long_text": tokens.long_text,
                      "chunk_stride": tokens.chunk_stride},
        "pooling": infer.pooling,
        "normalize": bool(infer.normalize),
        "precision": infer.precision,
        "engine": infer.engine,
        # ``auto`` settings as the launcher's machine resolves them.
        "planned_engine": config.planned_engine,
        "planned_precision": config.planned_precision,
        "sequence_dtype": config.write.sequence_dtype,
        "format": config.output_format,
    }


def output_schemas(config: Any) -> dict[str, Any]:
    """The Arrow schema of each kind of embedding file the run writes
    (``embeddings``, and ``documents`` with document vectors), as
    ``transforms.write.WriteEmbeddings`` builds them."""
    outputs, write = config.infer.outputs, config.write
    schemas = {EMBEDDINGS: embedding_schema(
        config.hidden_size, "pooled" in outputs, "sequence" in outputs,
        config.chunked, write.write_text, write.sequence_dtype)}
    if config.document_vectors:
        schemas[DOCUMENTS] = embedding_schema(config.hidden_size,
                                              sequence=False)
    return schemas


def schema_document(config: Any, files: dict[str, list[str]]
                    ) -> dict[str, Any]:
    """``<output>-schema.json``: the run's description and, per kind of
    embedding file, its files, columns (Arrow types, meanings) and, for
    TFRecord, its features.  The same record as each Parquet footer's
    ``bert_zh_embed`` key, plus the file lists."""
    description = dataset_description(config)
    record = dict(description)
    record["files"] = {}
    for kind, schema in output_schemas(config).items():
        footer = json.loads(file_metadata(description, schema,
                                          kind)[METADATA_KEY])
        entry: dict[str, Any] = {
            "files": files.get(kind, []),
            "columns": {field.name: {"type": str(field.type),
                                     "meaning": footer["columns"].get(
                                         field.name, "")}
                        for field in schema}}
        if config.output_format == TFRECORD:
            entry["tfrecord_features"] = tfrecord_features(
                schema, config.write.sequence_dtype if kind == EMBEDDINGS
                else "float32")
        record["files"][kind] = entry
    record["index"] = {"files": files.get(INDEX, []),
                       "columns": INDEX_MEANINGS}
    return record


@dataclasses.dataclass(frozen=True)
class IndexCounts:
    """What a run's index files hold."""
    runs: set[str]  # the run ids its entries point at
    entries: int  # one per id
    mapped: int  # entries whose vectors are another id's row (--dedup)

    @property
    def own(self) -> int:
        """Entries whose id has a row of its own."""
        return self.entries - self.mapped


def index_counts(index_files: Sequence[str]) -> IndexCounts:
    """Counts the entries of index files (index files written before
    ``embedded_as`` existed map nothing)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    runs: set[str] = set()
    entries = mapped = 0
    for path in index_files:
        with FileSystems.open(path) as handle:
            table = pq.read_table(handle)
        entries += table.num_rows
        runs.update(pc.unique(table.column(RUN_ID)).to_pylist())
        if EMBEDDED_AS in table.column_names and table.num_rows:
            own = pc.sum(pc.equal(table.column(ID),
                                  table.column(EMBEDDED_AS))).as_py()
            mapped += table.num_rows - own
    return IndexCounts(runs, entries, mapped)


def index_segments(own: dict[str, Any],
                   previous: Optional[PreviousIndex],
                   live: set[str]) -> list[dict[str, Any]]:
    """The segments of the new index: this run's and the previous ones'
    that index entries still point at, newest first."""
    candidates = [own] + (previous.segments if previous else [])
    seen: set[str] = set()
    segments = []
    for segment in candidates:
        if segment["run_id"] in live and segment["run_id"] not in seen:
            seen.add(segment["run_id"])
            segments.append(segment)
    return segments


def run_manifest(config: Any, summary: Any, started_at: str,
                 finished_at: str, files: dict[str, Any],
                 previous: Optional[PreviousIndex],
                 index: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a finished run (``config`` a ``JobConfig``,
    ``summary`` a ``RunSummary``); ``index`` is None for a failed run."""
    options = config.options()
    options["vocab_size"] = len(config.vocab)
    return {
        "manifest_version": MANIFEST_VERSION,
        "status": summary.status,
        "failure": summary.failure,
        "run_id": config.run_id,
        "started_at": started_at,
        "finished_at": finished_at,
        "output": config.output,
        "options": options,
        "model_fingerprint": config.model_fingerprint,
        "description": dataset_description(config),
        "layout": config.layout,
        "counts": summary.counts,
        "reconciled": summary.reconciled,
        "previous_index": previous.manifest if previous else None,
        "files": files,
        "index": index,
    }
