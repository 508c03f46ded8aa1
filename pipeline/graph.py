"""The pipeline graph: read -> [dedup] -> [incremental join] -> tokenize ->
batch + infer -> write.

``JobConfig`` is everything the graph needs, resolved by the launcher
(``pipeline.run``) before construction: each stage's own settings (checked
once, when they were made) and the job's fields (inputs, output, the
model's vocabulary and hidden size, the run's id, fingerprint and previous
index).  The vocabulary is passed to the tokenizer by value, so workers
never read it from the model again, and the model fingerprint and the
previous index's files are known up front.

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
from transforms.batch import BatchSettings
from transforms.dedup import DropDuplicates, KeepLastPerId, MapDuplicates
from transforms.embedding_files import (DELETED_SUFFIX, DOCUMENTS,
                                        DOCUMENTS_SUFFIX, INDEX_SUFFIX)
from transforms.incremental import (DELETED_TAG, UNCHANGED_TAG,
                                    CompleteDocumentEntries, SplitUnchanged,
                                    WriteDeleted, WriteIndex)
from transforms.infer import BertModelHandler, EmbedDocuments, InferSettings
from transforms.progress import ProgressConfig, TrackProgress
from transforms.read import ReadDocuments, ReadSettings
from transforms.records import WithDeadLetters
from transforms.tokenize import TokenizeDocuments, TokenizeSettings
from transforms.write import WriteDeadLetters, WriteEmbeddings, WriteSettings


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """A fully resolved embedding job: the stages' settings and the job's
    own fields."""
    inputs: Sequence[str]
    output: str
    vocab: Sequence[str]
    do_lower_case: bool
    hidden_size: int
    infer: InferSettings  # the model, its precision, engine and pooling
    read: ReadSettings = ReadSettings()
    tokenize: TokenizeSettings = TokenizeSettings()
    batch: BatchSettings = BatchSettings()
    # Output controls; the fingerprint and description are the job's.
    write: WriteSettings = WriteSettings()
    vocab_sha256: str = ""  # of the vocabulary file, for the description
    vocab_file: str = ""  # the vocabulary's path, for pipeline.embed
    output_format: str = "parquet"
    num_shards: int = 0
    document_vectors: bool = False
    # What ``--engine``/``--precision`` resolve to on the launcher's machine
    # (workers on other hardware may choose otherwise, and log it).
    planned_engine: str = ""
    planned_precision: str = ""
    # Identity and incremental runs.
    dedup: bool = False
    run_id: str = ""
    model_fingerprint: str = ""
    previous_index_files: Optional[Sequence[str]] = None  # None: no join
    reuse_previous: bool = True
    # Operation.
    input_bytes: Optional[int] = None
    progress_interval: float = 60.0

    @property
    def chunked(self) -> bool:
        return self.tokenize.chunked

    @property
    def write_settings(self) -> WriteSettings:
        """The output controls with the run's fingerprint and
        self-description."""
        return dataclasses.replace(
            self.write, model_fingerprint=self.model_fingerprint,
            description=json.dumps(dataset_description(self),
                                   sort_keys=True))

    def options(self) -> dict[str, Any]:
        """Every setting under its flag's name, one flat record (the
        manifest's ``options``, which ``pipeline.embed`` reads back); the
        vocabulary is left out."""
        read, tokens, batch = self.read, self.tokenize, self.batch
        infer, write = self.infer, self.write
        return {
            "inputs": list(self.inputs), "output": self.output,
            "model_dir": infer.model_dir,
            "do_lower_case": self.do_lower_case,
            "hidden_size": self.hidden_size,
            "vocab_sha256": self.vocab_sha256,
            "input_format": read.input_format, "id_field": read.id_field,
            "text_field": read.text_field,
            "output_format": self.output_format,
            "max_seq_length": tokens.max_seq_length,
            "batch_size": batch.batch_size,
            "max_tokens_per_batch": batch.max_tokens_per_batch,
            "bucket_boundaries": (None if batch.bucket_boundaries is None
                                  else list(batch.bucket_boundaries)),
            "outputs": list(infer.outputs), "num_shards": self.num_shards,
            "long_text": tokens.long_text,
            "chunk_stride": tokens.chunk_stride,
            "document_vectors": self.document_vectors,
            "pooling": infer.pooling, "normalize": infer.normalize,
            "vocab_file": self.vocab_file, "precision": infer.precision,
            "engine": infer.engine, "int8_model": infer.int8_model,
            "planned_engine": self.planned_engine,
            "planned_precision": self.planned_precision,
            "jit_compile": infer.jit_compile,
            "intra_op_threads": infer.intra_op_threads,
            "inter_op_threads": infer.inter_op_threads,
            "input_encoding": read.input_encoding,
            "max_text_chars": read.max_text_chars, "dedup": self.dedup,
            "run_id": self.run_id,
            "model_fingerprint": self.model_fingerprint,
            "previous_index_files": (None if self.previous_index_files is None
                                     else list(self.previous_index_files)),
            "reuse_previous": self.reuse_previous,
            "sequence_dtype": write.sequence_dtype,
            "parquet_compression": write.parquet_compression,
            "parquet_row_group_rows": write.row_group_rows,
            "tfrecord_compression": write.tfrecord_compression,
            "write_text": write.write_text,
            "input_bytes": self.input_bytes,
            "progress_interval": self.progress_interval}

    @property
    def layout(self) -> dict[str, Any]:
        """What rows look like on disk: an index mixes runs only when this is
        equal (see ``pipeline.manifest.load_previous``)."""
        return {"format": self.output_format,
                "tfrecord_compression": self.write.tfrecord_compression,
                "outputs": sorted(self.infer.outputs),
                "chunked": self.chunked,
                "document_vectors": self.document_vectors,
                "hidden_size": self.hidden_size,
                "sequence_dtype": self.write.sequence_dtype,
                "write_text": self.write.write_text}


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
        pipeline | "ReadDocuments" >> ReadDocuments(config.inputs,
                                                    config.read))
    documents, unchanged, dropped = _select_documents(pipeline, config,
                                                      documents, progress)
    _track(documents, "ProgressDocuments", "documents", progress)
    tokenize = TokenizeDocuments(config.vocab, config.do_lower_case,
                                 config.tokenize)
    tokens, tokenize_failures = (
        documents | "Tokenize" >> WithDeadLetters(tokenize))
    handler = BertModelHandler(config.infer, config.batch)
    embeddings, infer_failures = (
        tokens | "Embed" >> EmbedDocuments(handler, config.batch))
    _track(embeddings, "ProgressEmbeddings", "embeddings", progress)
    settings = config.write_settings
    _ = embeddings | "WriteEmbeddings" >> WriteEmbeddings(
        config.output, config.output_format, config.hidden_size,
        config.infer.outputs, config.num_shards, config.chunked, settings)
    if config.document_vectors:
        _ = (embeddings
             | "DocumentVectors" >> DocumentVectors(config.infer.normalize)
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
