"""The pipeline graph: read -> tokenize -> batch + infer -> write.

``JobConfig`` is everything the graph needs, resolved by the launcher
(``pipeline.run``) before construction: the vocabulary is passed to the
tokenizer by value, so workers never read it from the model again.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import apache_beam as beam

from transforms.aggregate import DocumentVectors
from transforms.infer import BertModelHandler, EmbedDocuments
from transforms.read import DEAD_LETTER_TAG, ReadDocuments
from transforms.tokenize import TokenizeDocuments
from transforms.write import (DOCUMENTS_SUFFIX, WriteDeadLetters,
                              WriteEmbeddings)


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """A fully resolved embedding job."""
    inputs: Sequence[str]
    output: str
    model_dir: str
    vocab: Sequence[str]
    do_lower_case: bool
    hidden_size: int
    input_format: str = "auto"
    id_field: str = "id"
    text_field: str = "text"
    output_format: str = "parquet"
    max_seq_length: int = 128
    batch_size: int = 32
    max_tokens_per_batch: int = 4096
    bucket_boundaries: Optional[Sequence[int]] = None
    outputs: Sequence[str] = ("pooled", "sequence")
    num_shards: int = 0
    long_text: str = "truncate"
    chunk_stride: Optional[int] = None
    document_vectors: bool = False
    precision: str = "float32"
    intra_op_threads: Optional[int] = None
    inter_op_threads: Optional[int] = None

    @property
    def chunked(self) -> bool:
        return self.long_text == "chunk"


def build_pipeline(pipeline: beam.Pipeline, config: JobConfig) -> None:
    """Adds the embedding job's transforms to ``pipeline``."""
    documents, read_failures = (
        pipeline | "ReadDocuments" >> ReadDocuments(
            config.inputs, config.input_format, config.id_field,
            config.text_field))
    tokenized = documents | "Tokenize" >> beam.ParDo(TokenizeDocuments(
        config.vocab, config.do_lower_case, config.max_seq_length,
        config.long_text, config.chunk_stride)
    ).with_outputs(DEAD_LETTER_TAG, main="tokens")
    handler = BertModelHandler(config.model_dir, config.outputs,
                               config.precision, config.intra_op_threads,
                               config.inter_op_threads)
    embeddings, infer_failures = (
        tokenized.tokens | "Embed" >> EmbedDocuments(
            handler, config.batch_size, config.max_tokens_per_batch,
            config.bucket_boundaries))
    _ = embeddings | "WriteEmbeddings" >> WriteEmbeddings(
        config.output, config.output_format, config.hidden_size,
        config.outputs, config.num_shards, config.chunked)
    if config.document_vectors:
        _ = (embeddings
             | "DocumentVectors" >> DocumentVectors()
             | "WriteDocumentVectors" >> WriteEmbeddings(
                 config.output + DOCUMENTS_SUFFIX, config.output_format,
                 config.hidden_size, ("pooled",), config.num_shards))
    _ = ((read_failures, tokenized[DEAD_LETTER_TAG], infer_failures)
         | "AllDeadLetters" >> beam.Flatten()
         | "WriteDeadLetters" >> WriteDeadLetters(config.output))
