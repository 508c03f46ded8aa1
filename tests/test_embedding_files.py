"""The output contract has one owner (``transforms.embedding_files``), and
dead letters have one shape.

Rows encoded by the module and written by the pipeline's writers come back
equal through the module's decoders, for Parquet and TFRecord and for the
dead-letter files; every file a writer makes is named by the module's
layout; no other module spells a column name or a file suffix; every stage
that makes dead letters returns ``(main, dead_letters)`` of one record.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
from pathlib import Path

import apache_beam as beam
from apache_beam.pipeline import PipelineVisitor
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

import transforms.embedding_files as contract
from transforms.embedding_files import (
    DOC_ID, ERRORS, ID, MODEL_FINGERPRINT, SEQUENCE_OUTPUT, dead_letter_line,
    dead_letter_of_line, embedding_schema, example_values, file_format,
    output_patterns, output_regex, read_file_metadata, table_columns,
    tf_compression)
from transforms.infer import _FailedBatchToDeadLetters
from transforms.read import ReadDocuments
from transforms.records import (DeadLetter, Document,
                                DocumentEmbedding, TokenizedDocument,
                                WithDeadLetters, safe_excerpt)
from transforms.tokenize import (MAX_CHUNKS_PER_DOCUMENT, TokenizeDocuments,
                                 TokenizeSettings)
from transforms.write import (ArrowTableCoder, WriteDeadLetters,
                              WriteEmbeddings, WriteSettings)

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 4
FINGERPRINT = "fp-0123"


def _rows(chunked: bool, write_text: bool) -> list[DocumentEmbedding]:
    """Embedding rows as the pipeline makes them: float16-exact vectors (so
    a float16 sequence compares exactly), texts only where written."""
    rng = np.random.default_rng(7)
    rows = []
    for doc in range(5):
        chunks = 3 if chunked and doc % 2 else 1
        for index in range(chunks):
            tokens = 2 + (doc + index) % 4
            vector = rng.standard_normal(HIDDEN).astype(np.float16)
            sequence = rng.standard_normal((tokens, HIDDEN)).astype(
                np.float16)
            text = (f"文本 {doc}" if write_text and index == 0 else None)
            rows.append(DocumentEmbedding(
                f"d{doc}#{index}" if chunked else f"d{doc}", tokens,
                bool(doc % 3 == 0), vector.astype(np.float32),
                sequence.astype(np.float32),
                f"d{doc}" if chunked else "", index, chunks,
                f"hash-{doc}", text))
    return rows


_LETTERS = [
    DeadLetter("read", "malformed JSON: Expecting value", "in/a.jsonl", 3,
               "", '{"id": 1, "text"'),
    DeadLetter("tokenize", "ValueError: too long", "in/b.jsonl", 9, "b9",
               "坏\x00字" * 150),  # control character, over the excerpt cap
    DeadLetter("infer", "ResourceExhaustedError: OOM", "in/c.jsonl", 1,
               "c1#0"),
]


def _write(prefix: str, rows: list[DocumentEmbedding], fmt: str,
           settings: WriteSettings, chunked: bool) -> None:
    pipeline = beam.Pipeline(runner="DirectRunner")
    _ = (pipeline
         | "Rows" >> beam.Create(rows)
         | WriteEmbeddings(prefix, fmt, HIDDEN, ("pooled", "sequence"),
                           num_shards=2, chunked=chunked, settings=settings))
    _ = (pipeline
         | "Letters" >> beam.Create(_LETTERS)
         | WriteDeadLetters(prefix))
    pipeline.run().wait_until_finish()


def _decoded_rows(files: list[str]) -> list[dict]:
    """Every row of ``files``, as the module decodes them (column name ->
    value)."""
    decoded = []
    for path in files:
        if file_format(path) == contract.PARQUET:
            columns = table_columns(pq.read_table(path))
            count = len(columns[ID])
            decoded += [{name: values[i] for name, values in columns.items()}
                        for i in range(count)]
        else:
            decoded += [example_values(record.numpy()) for record in
                        tf.data.TFRecordDataset(
                            [path], compression_type=tf_compression(path))]
    return decoded


def assert_scalar_only_dictionaries_and_statistics(path: str) -> int:
    """Every column chunk of the Parquet file at ``path``: the vector
    columns are written without dictionary pages or min/max statistics,
    every other column with statistics (and the string ones with a
    dictionary), as ``parquet_writer_options`` says.  Returns the number
    of row groups checked."""
    metadata = pq.ParquetFile(path).metadata
    schema = metadata.schema.to_arrow_schema()
    for group in range(metadata.num_row_groups):
        for index in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(index)
            column = chunk.path_in_schema.split(".")[0]
            if column in contract.VECTOR_COLUMNS:
                assert not chunk.has_dictionary_page, chunk.path_in_schema
                assert not chunk.is_stats_set, chunk.path_in_schema
                assert not {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & set(
                    chunk.encodings), chunk.encodings
            else:
                assert chunk.is_stats_set, column
                if schema.field(column).type == pa.string():
                    assert chunk.has_dictionary_page, column
    return metadata.num_row_groups


def test_writer_options_leave_out_the_vector_columns_of_every_schema():
    for chunked, text, pooled, sequence in [
            (False, False, True, True), (True, True, True, True),
            (False, False, True, False), (True, False, False, True)]:
        schema = embedding_schema(HIDDEN, pooled, sequence, chunked, text)
        options = contract.parquet_writer_options(schema)
        scalars = [name for name in schema.names
                   if name not in contract.VECTOR_COLUMNS]
        assert options == {"use_dictionary": scalars,
                           "write_statistics": scalars}
        assert len(scalars) == len(schema) - pooled - sequence


def test_row_group_tables_travel_as_arrow_and_are_sized_without_encoding(
        monkeypatch):
    schema = embedding_schema(HIDDEN, chunked=True, write_text=True)
    schema = schema.with_metadata({b"bert_zh_embed": b'{"run_id": "r1"}'})
    table = pa.Table.from_batches([contract.to_record_batch(
        _rows(True, True), schema, FINGERPRINT)], schema=schema)
    coder = beam.coders.registry.get_coder(pa.Table)
    assert isinstance(coder, ArrowTableCoder)
    back = coder.decode(coder.encode(table))
    assert back.equals(table) and back.schema.metadata == schema.metadata
    # Beam sizes sampled elements with estimate_size: it must not encode.
    monkeypatch.setattr(ArrowTableCoder, "encode", None)
    assert coder.get_impl().estimate_size(table) == table.nbytes > 0

    class Outputs(PipelineVisitor):
        types: dict[str, object] = {}

        def visit_transform(self, node) -> None:
            for output in node.outputs.values():
                self.types[node.full_label] = output.element_type

    pipeline = beam.Pipeline(runner="DirectRunner")
    _ = pipeline | beam.Create([]) | "W" >> WriteEmbeddings(
        "unused", contract.PARQUET, HIDDEN, ("pooled",))
    pipeline.visit(Outputs())
    assert Outputs.types["W/ToArrow"] == pa.Table


def _as_row(values: dict) -> DocumentEmbedding:
    """A decoded row as a ``DocumentEmbedding`` (its fields are named as the
    columns; absent columns keep the dataclass defaults)."""
    fields = {f.name for f in dataclasses.fields(DocumentEmbedding)}
    kept = {name: value for name, value in values.items() if name in fields}
    kept.setdefault(SEQUENCE_OUTPUT, None)
    return DocumentEmbedding(**kept)


def _assert_same_row(got: DocumentEmbedding, want: DocumentEmbedding,
                     sequence_dtype: str) -> None:
    for field in dataclasses.fields(DocumentEmbedding):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if isinstance(b, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=field.name)
        else:
            assert a == b, (field.name, a, b)
    assert got.pooled_output.dtype == np.float32
    assert got.sequence_output.dtype == np.dtype(sequence_dtype)


@pytest.mark.parametrize("fmt,compression,sequence_dtype,chunked,text", [
    ("parquet", "none", "float32", False, False),
    ("parquet", "zstd", "float16", True, True),
    ("tfrecord", "none", "float32", True, False),
    ("tfrecord", "gzip", "float16", False, True),
])
def test_rows_written_by_the_pipeline_decode_back_equal(
        tmp_path, fmt, compression, sequence_dtype, chunked, text):
    prefix = str(tmp_path / "emb")
    rows = _rows(chunked, text)
    description = {"schema_version": contract.SCHEMA_VERSION,
                   "run_id": "r1", "model": {"fingerprint": FINGERPRINT,
                                             "hidden_size": HIDDEN}}
    parquet = fmt == contract.PARQUET
    settings = WriteSettings(
        FINGERPRINT, sequence_dtype, text,
        parquet_compression=compression if parquet else "none",
        tfrecord_compression="none" if parquet else compression,
        description=json.dumps(description))
    _write(prefix, rows, fmt, settings, chunked)

    patterns = output_patterns(prefix, fmt, settings.tfrecord_compression)
    owned = {kind: sorted(p for p in glob.glob(pattern)
                          if output_regex(pattern).fullmatch(p))
             for kind, pattern in patterns.items()}
    # Every file the writers made is one of the layout's names.
    written = sorted(str(p) for p in tmp_path.iterdir())
    assert written == sorted(p for files in owned.values() for p in files)
    assert len(owned[contract.EMBEDDINGS]) == 2 and owned[ERRORS]

    decoded = _decoded_rows(owned[contract.EMBEDDINGS])
    assert {v[MODEL_FINGERPRINT] for v in decoded} == {FINGERPRINT}
    assert all((DOC_ID in v) == chunked for v in decoded)
    by_id = {v[ID]: _as_row(v) for v in decoded}
    assert sorted(by_id) == sorted(r.id for r in rows)
    for row in rows:
        _assert_same_row(by_id[row.id], row, sequence_dtype)

    if fmt == contract.PARQUET:
        path = owned[contract.EMBEDDINGS][0]
        schema = pq.read_schema(path)
        assert schema.remove_metadata() == embedding_schema(
            HIDDEN, chunked=chunked, write_text=text,
            sequence_dtype=sequence_dtype)
        footer = read_file_metadata(schema.metadata)
        assert footer["model"]["fingerprint"] == FINGERPRINT
        assert set(footer["columns"]) == set(schema.names)
        assert sum(assert_scalar_only_dictionaries_and_statistics(path)
                   for path in owned[contract.EMBEDDINGS]) >= 1

    letters = [dead_letter_of_line(line)
               for path in owned[ERRORS]
               for line in Path(path).read_text("utf-8").splitlines()]
    expected = [dataclasses.replace(letter,
                                    excerpt=safe_excerpt(letter.excerpt))
                for letter in _LETTERS]
    assert sorted(letters, key=lambda d: d.stage) == sorted(
        expected, key=lambda d: d.stage)


def test_a_dead_letter_line_decodes_to_the_record_it_encodes():
    for letter in _LETTERS:
        line = dead_letter_line(letter)
        assert "\n" not in line
        assert dead_letter_of_line(line) == dataclasses.replace(
            letter, excerpt=safe_excerpt(letter.excerpt))


# --- one owner: no other module spells the contract's names ------------------

# Strings that are the contract's and nothing else's in the code.
_CONTRACT_STRINGS = {
    contract.DOC_ID, contract.CHUNK_INDEX, contract.NUM_CHUNKS,
    contract.CONTENT_HASH, contract.POOLED_OUTPUT, contract.SEQUENCE_OUTPUT,
    contract.SEQUENCE_SHAPE, contract.EMBEDDED_AS,
    contract.DOCUMENTS_SUFFIX, contract.ERRORS_SUFFIX, contract.INDEX_SUFFIX,
    contract.DELETED_SUFFIX, contract.SUMMARY_SUFFIX,
    contract.MANIFEST_SUFFIX, contract.SCHEMA_SUFFIX, contract.DUCKDB_SUFFIX,
    contract.COMPACT_SUFFIX, contract.LOCK_SUFFIX, contract.SHARD_GLOB,
    contract.SHARD_REGEX, "-errors-", "-of-",
    contract.shard_name(0, 1) + contract.PARQUET_EXT,
}
# The output's file suffixes; transforms.sources detects input formats by
# the same suffixes, and model/ names its own files.
_SUFFIXES = {contract.PARQUET_EXT, contract.TFRECORD_EXT, contract.JSONL_EXT,
             contract.TFRECORD_EXT + contract.GZIP_EXT, contract.GZIP_EXT}
_INPUT_SIDE = {"transforms/sources.py"}
_DIRECTORIES = ("transforms", "pipeline", "bench", "dataflow")


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text("utf-8"))
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                             ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_no_module_but_the_contract_spells_a_column_or_file_suffix():
    found = []
    for directory in _DIRECTORIES:
        for path in sorted((ROOT / directory).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name == "transforms/embedding_files.py":
                continue
            wanted = _CONTRACT_STRINGS | (
                set() if name in _INPUT_SIDE else _SUFFIXES)
            found += [f"{name}:{line}: {value!r}"
                      for line, value in _string_literals(path)
                      if value in wanted]
    assert not found, "\n".join(found)


def test_the_dead_letter_tag_is_defined_once():
    definitions = []
    for directory in ("transforms", "pipeline"):
        for path in sorted((ROOT / directory).rglob("*.py")):
            tree = ast.parse(path.read_text("utf-8"))
            definitions += [
                path.name for node in ast.walk(tree)
                if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "DEAD_LETTER_TAG"
                        for t in node.targets)]
    assert definitions == ["records.py"]


# --- dead letters: one shape from every stage --------------------------------


def test_every_stage_returns_main_and_dead_letters_of_one_record(
        tmp_path, small_vocab):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text('{"id": "a", "text": "今天天气很好"}\n'
                      '{"id": "b", "text": \n', encoding="utf-8")
    prefix = str(tmp_path / "out" / "emb")
    pipeline = beam.Pipeline(runner="DirectRunner")
    read = pipeline | "Read" >> ReadDocuments([str(corpus)])
    assert isinstance(read, tuple) and len(read) == 2
    documents, read_dead = read
    # Over MAX_CHUNKS_PER_DOCUMENT windows of 2 wordpieces: refused.
    broken = pipeline | "Broken" >> beam.Create(
        [Document("c", "好" * (2 * MAX_CHUNKS_PER_DOCUMENT + 1),
                  "other.jsonl", 5)])
    tokenized = ((documents, broken) | beam.Flatten()
                 | "Tokenize" >> WithDeadLetters(
                     TokenizeDocuments(small_vocab, True,
                                       TokenizeSettings(4, "chunk"))))
    assert isinstance(tokenized, tuple) and len(tokenized) == 2
    tokens, tokenize_dead = tokenized
    _ = ((read_dead, tokenize_dead) | "All" >> beam.Flatten()
         | WriteDeadLetters(prefix))
    _ = (tokens | beam.Map(lambda t: t.doc_id)
         | beam.io.WriteToText(prefix + "-tokens"))
    pipeline.run().wait_until_finish()

    letters = sorted((dead_letter_of_line(line) for path in
                      glob.glob(output_patterns(prefix, "parquet")[ERRORS])
                      for line in Path(path).read_text("utf-8").splitlines()),
                     key=lambda d: d.stage)
    assert [(d.stage, d.source, d.line, d.id) for d in letters] == [
        ("read", str(corpus), 2, ""), ("tokenize", "other.jsonl", 5, "c")]
    assert all(d.reason and "\n" not in d.reason for d in letters)
    (tokens_file,) = glob.glob(prefix + "-tokens*")
    assert set(Path(tokens_file).read_text("utf-8").split()) == {"a"}

    # Inference's dead letters are the same record for a document chunk.
    chunk = TokenizedDocument("d#1", np.array([1, 2, 3], np.int32), False,
                              "d", 1, 2, source="in/d.jsonl", line=4)
    (infer,) = _FailedBatchToDeadLetters().process(
        ([chunk], ValueError("boom")))
    assert infer == DeadLetter("infer", "ValueError: boom", "in/d.jsonl", 4,
                               "d#1")
