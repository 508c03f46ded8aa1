"""DuckDB views of a published dataset, with the vectors typed ``FLOAT[H]``.

Parquet has no fixed-size list type: Arrow's ``fixed_size_list<float>[H]``
is stored as a plain list, and the Arrow schema kept in the footer
(``ARROW:schema``), from which pyarrow and Polars restore the fixed size
(Polars: ``Array(Float32, H)``), is not read by DuckDB, which sees
``FLOAT[]``; DuckDB's array functions (``array_cosine_similarity``,
``array_inner_product``, ...) take ``FLOAT[H]`` only.  So a Parquet run
(and ``pipeline.compact``) publishes ``<output>-duckdb.sql``: ``CREATE
VIEW`` statements over its files that type the vectors ``FLOAT[H]``
(``FLOAT[H][]`` for the sequence), for ``duckdb -c ".read
out/emb-duckdb.sql"`` or ``con.execute(open(path).read())``.

A run's view is its current dataset, as ``load_index(...,
expand_duplicates=True)`` reads it: the rows of the segments' files that the
index points at (same document, content hash, model fingerprint and run),
one row per index entry, so that an id ``--dedup`` mapped to another id's
row comes with that row's vectors and ``embedded_as`` naming it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from transforms.embedding_files import (CHUNK_INDEX, CONTENT_HASH, DOC_ID,
                                        EMBEDDED_AS, ID, MODEL_FINGERPRINT,
                                        POOLED_OUTPUT, RUN_ID,
                                        SEQUENCE_OUTPUT, vector_width)


def sql_string(text: str) -> str:
    """``text`` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _view_path(path: str) -> str:
    """A path as the view names it: local paths absolute (the view may be
    read from another directory), others as they are (``gs://``...)."""
    return path if "://" in path else os.path.abspath(path)


def _file_list(paths: Sequence[str]) -> str:
    return "[" + ", ".join(sql_string(_view_path(p)) for p in paths) + "]"


def _casts(schema: Any, table: str) -> list[str]:
    """``CAST(... AS FLOAT[H]) AS name`` for each vector column."""
    width = vector_width(schema)
    casts = []
    if POOLED_OUTPUT in schema.names:
        casts.append(f"CAST({table}{POOLED_OUTPUT} AS FLOAT[{width}]) "
                     f"AS {POOLED_OUTPUT}")
    if SEQUENCE_OUTPUT in schema.names:
        casts.append(f"CAST({table}{SEQUENCE_OUTPUT} AS FLOAT[{width}][]) "
                     f"AS {SEQUENCE_OUTPUT}")
    return casts


def files_view(name: str, files: Sequence[str], schema: Any) -> str:
    """A view of every row of ``files`` (a compacted dataset)."""
    return (f"CREATE OR REPLACE VIEW {name} AS\n"
            f"SELECT * REPLACE ({', '.join(_casts(schema, ''))})\n"
            f"FROM read_parquet({_file_list(files)});\n")


def indexed_view(name: str, segments: Sequence[tuple[str, Sequence[str]]],
                 index_files: Sequence[str], schema: Any) -> str:
    """A view of the rows the index points at: ``segments`` are (run id,
    files of that run); one row per index entry, ids mapped by ``--dedup``
    included (``embedded_as``)."""
    files = [path for _, paths in segments for path in paths]
    runs = ", ".join(f"({sql_string(_view_path(path))}, {sql_string(run)})"
                     for run, paths in segments for path in paths)
    replaced = _casts(schema, "e.")
    if DOC_ID in schema.names:
        key = f"e.{DOC_ID}"
        replaced += [f"i.{ID} || '#' || CAST(e.{CHUNK_INDEX} AS VARCHAR) "
                     f"AS {ID}", f"i.{ID} AS {DOC_ID}"]
    else:
        key = f"e.{ID}"
        replaced.append(f"i.{ID} AS {ID}")
    return (
        f"CREATE OR REPLACE VIEW {name} AS\n"
        f"SELECT e.* EXCLUDE (filename) REPLACE ({', '.join(replaced)}),\n"
        f"       i.{EMBEDDED_AS} AS {EMBEDDED_AS}\n"
        f"FROM read_parquet({_file_list(files)}, filename = true) AS e\n"
        f"JOIN (VALUES {runs}) AS f(filename, {RUN_ID})\n"
        "  ON f.filename = e.filename\n"
        f"JOIN read_parquet({_file_list(index_files)}) AS i\n"
        f"  ON i.{EMBEDDED_AS} = {key} AND i.{CONTENT_HASH} = e.{CONTENT_HASH}"
        "\n"
        f"  AND i.{MODEL_FINGERPRINT} = e.{MODEL_FINGERPRINT}\n"
        f"  AND i.{RUN_ID} = f.{RUN_ID};\n")


def views_file(title: str, views: Sequence[str]) -> str:
    """The text of a ``-duckdb.sql`` file: a comment line, then the views."""
    return (f"-- {title}\n-- DuckDB: .read this file, then e.g. SELECT id, "
            "array_cosine_similarity(pooled_output, pooled_output) FROM "
            "embeddings;\n" + "".join(views))


def write_text(text: str, path: str) -> None:
    """Writes ``text`` as UTF-8 to ``path`` (any Beam file system)."""
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.create(path) as handle:
        handle.write(text.encode("utf-8"))
