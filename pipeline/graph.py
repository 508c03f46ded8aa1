"""The pipeline graph: read -> [dedup] -> [incremental join] -> tokenize ->
batch + infer -> write.

``JobConfig`` is everything the graph needs, resolved by the launcher
(``pipeline.run``) before construction: the vocabulary is passed to the
tokenizer by value, so workers never read it from the model again, and the
model fingerprint and the previous index's files are known up front.

Besides the embeddings and the dead letters, every run writes its index
(``<output>-index/part-*.parquet``: one entry per document of the current
dataset, see ``transforms.incremental``) and, when it builds on a previous
index, the documents deleted since (``<output>-deleted-*.jsonl``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Sequence

import apache_beam as beam

from transforms.aggregate import DocumentVectors
from pipeline.manifest import dataset_description
from transforms.dedup import DropDuplicates, KeepLastPerId, MapDuplicates
from transforms.embedding_files import (DELETED_SUFFIX, DOCUMENTS,
                                        DOCUMENTS_SUFFIX, INDEX_SUFFIX)
from transforms.incremental import (DELETED_TAG, UNCHANGED_TAG,
                                    CompleteDocumentEntries, SplitUnchanged,
                                    WriteDeleted, WriteIndex)
from transforms.infer import BertModelHandler, EmbedDocuments
from transforms.progress import ProgressConfig, TrackProgress
from transforms.read import DEFAULT_MAX_TEXT_CHARS, ReadDocuments
from transforms.records import WithDeadLetters
from transforms.tokenize import TokenizeDocuments
from transforms.write import WriteDeadLetters, WriteEmbeddings, WriteSettings


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """A fully resolved embedding job."""
    inputs: Sequence[str]
    output: str
    model_dir: str
    vocab: Sequence[str]
    do_lower_case: bool
    hidden_size: int
    vocab_sha256: str = ""  # of the vocabulary file, for the description
    input_format: str = "auto"
    id_field: str = "id"
    text_field: str = "text"
    output_format: str = "parquet"
    max_seq_length: int = 128
    batch_size: int = 32
    max_tokens_per_batch: int = 2048
    bucket_boundaries: Optional[Sequence[int]] = None
    outputs: Sequence[str] = ("pooled", "sequence")
    num_shards: int = 0
    long_text: str = "truncate"
    chunk_stride: Optional[int] = None
    document_vectors: bool = False
    # How pooled_output is made (transforms.pooling); recorded in the
    # manifest's options, where pipeline.embed reads them back.
    pooling: str = "cls"
    normalize: bool = False
    vocab_file: str = ""  # the vocabulary's path, for pipeline.embed
    precision: str = "float32"
    engine: str = "tensorflow"  # see model.engines
    int8_model: Optional[str] = None
    # What ``--engine``/``--precision`` resolve to on the launcher's machine
    # (workers on other hardware may choose otherwise, and log it).
    planned_engine: str = ""
    planned_precision: str = ""
    jit_compile: bool = True
    intra_op_threads: Optional[int] = None
    inter_op_threads: Optional[int] = None
    # Input, identity and incremental runs.
    input_encoding: str = "utf-8"
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    dedup: bool = False
    run_id: str = ""
    model_fingerprint: str = ""
    previous_index_files: Optional[Sequence[str]] = None  # None: no join
    reuse_previous: bool = True
    # Output controls.
    sequence_dtype: str = "float32"
    parquet_compression: str = "none"
    parquet_row_group_rows: int = 0
    tfrecord_compression: str = "none"
    write_text: bool = False
    # Operation.
    input_bytes: Optional[int] = None
    progress_interval: float = 60.0

    @property
    def chunked(self) -> bool:
        return self.long_text == "chunk"

    @property
    def write_settings(self) -> WriteSettings:
        return WriteSettings(
            self.model_fingerprint, self.sequence_dtype, self.write_text,
            self.parquet_compression, self.parquet_row_group_rows,
            self.tfrecord_compression,
            json.dumps(dataset_description(self), sort_keys=True))

    @property
    def layout(self) -> dict[str, Any]:
        """What rows look like on disk: an index mixes runs only when this is
        equal (see ``pipeline.manifest.load_previous``)."""
        return {"format": self.output_format,
                "tfrecord_compression": self.tfrecord_compression,
                "outputs": sorted(self.outputs), "chunked": self.chunked,
                "document_vectors": self.document_vectors,
                "hidden_size": self.hidden_size,
                "sequence_dtype": self.sequence_dtype,
                "write_text": self.write_text}


def _track(pcoll: beam.PCollection, label: str, kind: str,
           progress: ProgressConfig) -> None:
    _ = pcoll | label >> beam.ParDo(TrackProgress(kind, progress))


def _select_documents(pipeline: beam.Pipeline, config: JobConfig,
                      documents: beam.PCollection,
                      progress: ProgressConfig) -> tuple[Any, Any]:
    """One document per id, dedup and the incremental join: (documents to
    embed, index entries of unchanged documents or None, documents dropped
    by --dedup or None)."""
    documents, same_id = documents | "UniqueIds" >> KeepLastPerId()
    _track(same_id, "ProgressSameId", "done", progress)
    duplicates = None
    if config.dedup:
        documents, duplicates = documents | "Dedup" >> DropDuplicates()
        _track(duplicates, "ProgressDuplicates", "done", progress)
    if config.previous_index_files is None:
        return documents, None, duplicates
    dropped = duplicates
    if duplicates is None:
        duplicates = pipeline | "NoDuplicates" >> beam.Create([])
    split = (documents, duplicates) | "Incremental" >> SplitUnchanged(
        config.previous_index_files, config.model_fingerprint,
        config.reuse_previous)
    _ = split[DELETED_TAG] | "WriteDeleted" >> WriteDeleted(
        config.output + DELETED_SUFFIX)
    _track(split[UNCHANGED_TAG], "ProgressUnchanged", "done", progress)
    return split.to_embed, split[UNCHANGED_TAG], dropped


def build_pipeline(pipeline: beam.Pipeline, config: JobConfig) -> None:
    """Adds the embedding job's transforms to ``pipeline``."""
    progress = ProgressConfig(config.run_id, config.progress_interval,
                              config.input_bytes)
    # Every stage that makes dead letters returns (main, dead letters).
    documents, read_failures = (
        pipeline | "ReadDocuments" >> ReadDocuments(
            config.inputs, config.input_format, config.id_field,
            config.text_field, config.input_encoding, config.max_text_chars))
    documents, unchanged, dropped = _select_documents(pipeline, config,
                                                      documents, progress)
    _track(documents, "ProgressDocuments", "documents", progress)
    tokenize = TokenizeDocuments(
        config.vocab, config.do_lower_case, config.max_seq_length,
        config.long_text, config.chunk_stride, config.write_text)
    tokens, tokenize_failures = (
        documents | "Tokenize" >> WithDeadLetters(tokenize))
    handler = BertModelHandler(
        config.model_dir, config.outputs, config.precision,
        config.intra_op_threads, config.inter_op_threads,
        config.jit_compile, config.max_seq_length,
        config.pooling, config.normalize, config.engine, config.int8_model)
    embeddings, infer_failures = (
        tokens | "Embed" >> EmbedDocuments(
            handler, config.batch_size, config.max_tokens_per_batch,
            config.bucket_boundaries))
    _track(embeddings, "ProgressEmbeddings", "embeddings", progress)
    settings = config.write_settings
    _ = embeddings | "WriteEmbeddings" >> WriteEmbeddings(
        config.output, config.output_format, config.hidden_size,
        config.outputs, config.num_shards, config.chunked, settings)
    if config.document_vectors:
        _ = (embeddings
             | "DocumentVectors" >> DocumentVectors(config.normalize)
             | "WriteDocumentVectors" >> WriteEmbeddings(
                 config.output + DOCUMENTS_SUFFIX, config.output_format,
                 config.hidden_size, ("pooled",), config.num_shards,
                 settings=dataclasses.replace(settings, write_text=False,
                                              kind=DOCUMENTS)))
    entries = embeddings | "IndexEntries" >> CompleteDocumentEntries(
        config.model_fingerprint, config.run_id, config.chunked)
    if unchanged is not None:
        entries = (entries, unchanged) | "AllIndexEntries" >> beam.Flatten()
    if dropped is not None:  # --dedup: every dropped id stays findable
        mapped = (entries, dropped) | "MapDuplicates" >> MapDuplicates()
        entries = (entries, mapped) | "WithMapped" >> beam.Flatten()
    _ = entries | "WriteIndex" >> WriteIndex(config.output + INDEX_SUFFIX)
    _ = ((read_failures, tokenize_failures, infer_failures)
         | "AllDeadLetters" >> beam.Flatten()
         | "WriteDeadLetters" >> WriteDeadLetters(config.output))
