"""Real-world input: formats, encodings, broken records, duplicates.

Unit tests check each input rule on bytes in memory; the end-to-end runs
read fixtures built here (JSONL with malformed lines, a text file with
invalid UTF-8 in the middle, an empty file, a gzip file, CSV, TSV, Parquet,
a GB18030 file) and check the dead letters and that the counts reconcile
exactly.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.read_embeddings import load_embeddings
from pipeline.run import EXIT_ERROR_RATE, main, run
from transforms.embedding_files import dead_letter_line
from transforms.identity import content_hash, derived_id
from transforms.read import RecordParser
from transforms.records import DeadLetter, Document
from transforms.sources import (RawRecord, csv_records, detect_format,
                                text_records)

MAX_SEQ = 32
SAME = "今天天气很好"  # the text of three documents in the mixed corpus


def _lines(data: bytes, encoding: str = "utf-8",
           limit: int = 1 << 20) -> list[RawRecord]:
    return list(text_records(io.BytesIO(data), encoding, limit, False))


# --- encodings and line splitting --------------------------------------------


@pytest.mark.parametrize("encoding", ["gb18030", "gbk", "big5"])
def test_chinese_encodings_decode_line_by_line(encoding):
    texts = ["請問訂單", "客服回覆"] if encoding == "big5" else \
        ["今天天气很好", "客服回复很及时"]
    data = "\n".join(texts).encode(encoding) + b"\r\n"
    assert [r.text for r in _lines(data, encoding)] == texts


def test_gb18030_bom_and_four_byte_characters():
    text = "𠀀字"  # U+20000 is a four-byte GB18030 sequence
    data = "\ufeff".encode("gb18030") + f"{text}\n好".encode("gb18030")
    records = _lines(data, "gb18030")
    assert [r.text for r in records] == [text, "好"]
    assert sum(r.nbytes for r in records) == len(data)


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_byte_order_from_bom_and_no_split_inside_characters(codec):
    # 上 is U+4E0A: its UTF-16 code unit holds a 0x0A byte, which must not
    # end the line.
    bom = codecs.BOM_UTF16_LE if codec.endswith("le") else codecs.BOM_UTF16_BE
    data = bom + "上海\n天上\r\n".encode(codec)
    assert [r.text for r in _lines(data, "utf-16")] == ["上海", "天上"]


def test_utf8_bom_is_dropped():
    data = codecs.BOM_UTF8 + "你好\n".encode()
    assert [r.text for r in _lines(data)] == ["你好"]


def test_invalid_bytes_make_one_bad_record_and_reading_goes_on():
    data = "第一行\n".encode() + b"\xe4\xbd bad \xff\n" + "第三行".encode()
    first, bad, third = _lines(data)
    assert (first.text, third.text) == ("第一行", "第三行")
    assert bad.line == 2 and bad.text is None
    assert bad.error.startswith("not valid UTF-8: invalid continuation byte")
    assert "bad" in bad.excerpt and "\ufffd" in bad.excerpt


def test_over_long_line_is_an_error_record_not_held_in_memory():
    data = b"short\n" + b"x" * 5000 + b"\nafter"
    records = _lines(data, limit=1000)
    assert [r.text for r in records] == ["short", None, "after"]
    assert records[1].error == "line of 5001 bytes is over the 1000-byte limit"
    assert len(records[1].excerpt) <= 1024


def test_csv_rows_by_header_with_quoted_newlines_and_bad_rows():
    data = ('\ufeffid,text\n'
            'c1,"多行\n文本"\n'
            'c2\n'
            '\n'
            'c3,"他说""好"""\n').encode()
    records = list(csv_records(io.BytesIO(data), "utf-8", 1 << 20, ","))
    assert [(r.line, r.fields, r.error) for r in records] == [
        (2, {"id": "c1", "text": "多行\n文本"}, None),
        (4, None, "malformed CSV row: 1 fields, the header has 2"),
        (6, {"id": "c3", "text": '他说"好"'}, None)]


def test_csv_row_with_undecodable_bytes_is_an_error_record():
    data = "id\ttext\n".encode("gbk") + b"t1\t\x81\x20x\n" + \
        "t2\t好\n".encode("gbk")
    bad, good = csv_records(io.BytesIO(data), "gbk", 1 << 20, "\t")
    assert bad.error.startswith("not valid GBK") and bad.line == 2
    assert good.fields == {"id": "t2", "text": "好"}


@pytest.mark.parametrize("path, expected", [
    ("a/b.csv", "csv"), ("a/b.tsv.gz", "tsv"), ("a/b.tab", "tsv"),
    ("gs://x/b.parquet", "parquet"), ("b.pq", "parquet"),
    ("b.json.bz2", "jsonl"), ("b.txt", "text"), ("b", "text")])
def test_detect_format_by_suffix(path, expected):
    assert detect_format(path, "auto") == expected


# --- records to documents ----------------------------------------------------


def test_record_parser_rules():
    parser = RecordParser("meta.id", "body", max_text_chars=5)
    parse = lambda fields: parser.parse(  # noqa: E731
        "gs://b/in/x.jsonl", "jsonl",
        RawRecord(7, 10, text=json.dumps(fields, ensure_ascii=False)))
    doc = parse({"meta": {"id": 42}, "body": "你好"})
    assert isinstance(doc, Document)
    assert (doc.id, doc.text, doc.line, doc.nbytes) == ("42", "你好", 7, 10)
    assert doc.content_hash == content_hash("你好")
    # No id (or an empty one): derived from the file name and the content.
    assert parse({"body": "你好"}).id == f"x.jsonl:{content_hash('你好')[:16]}"
    assert parse({"meta": {"id": ""}, "body": "你好"}).id == \
        derived_id("x.jsonl", content_hash("你好"))
    reasons = {
        "missing text field 'body'": {"meta": {"id": 1}},
        "text field 'body' is list, not a string": {"body": ["a"]},
        "text of 6 characters is over --max_text_chars 5": {"body": "六个字符六个"},
        "text or id holds unpaired surrogate escapes": {"body": "\udc80"},
    }
    for reason, fields in reasons.items():
        dead = parse(fields)
        assert isinstance(dead, DeadLetter) and dead.reason == reason
        assert (dead.stage, dead.source, dead.line) == (
            "read", "gs://b/in/x.jsonl", 7)
        json.loads(dead_letter_line(dead))  # always writable as UTF-8 JSON


def test_derived_ids_survive_a_line_inserted_above():
    parser = RecordParser()

    def ids(lines: list[str]) -> list[str]:
        return [parser.parse("c.txt", "text", RawRecord(i, 0, text=t)).id
                for i, t in enumerate(lines, start=1)]

    before = ids(["甲", "乙"])
    after = ids(["新", "甲", "乙"])
    assert after[1:] == before and after[0] not in before


# --- end to end ------------------------------------------------------------


def _jsonl(path: Path, records: list, opener=open) -> None:
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(record if isinstance(record, str) else
                         json.dumps(record, ensure_ascii=False))
            handle.write("\n")


def _mixed_corpus(root: Path) -> list[str]:
    """Fixtures of every format; returns the --input patterns."""
    _jsonl(root / "news.jsonl", [
        {"id": "n1", "text": SAME},
        '{"id": "n2", "text": ',  # malformed
        {"id": "n3"},  # no text
        {"id": "n4", "text": SAME},  # duplicate
        "",  # blank: not a record
        {"id": "n6", "text": "长" * 250}])  # over --max_text_chars 200
    (root / "lines.txt").write_bytes(
        "客服回复很及时\n".encode() + b"\xe5\xae bad bytes\n"
        + "北京时间昨晚\n\n".encode())
    (root / "empty.txt").write_bytes(b"")
    _jsonl(root / "more.jsonl.gz", [{"id": "g1", "text": "手机电池续航一般"},
                                    {"id": "g2", "text": "拍照效果不错"}],
           opener=gzip.open)
    (root / "table.csv").write_text(
        'id,text\nc1,房间干净\nc2,"多行\n文本"\nc3\nc4,\n'
        f'c5,{SAME}\n', encoding="utf-8")
    (root / "table.tsv").write_text("id\ttext\nt1\t请问订单\nt2\t什么时候发货\n",
                                    encoding="utf-8")
    pq.write_table(pa.table({"id": ["p1", "p2", "p3"],
                             "text": ["问题解决了", None, "服务非常好"],
                             "extra": [1, 2, 3]}), root / "rows.parquet")
    (root / "broken.parquet").write_bytes(b"not a parquet file")
    return [str(root / "*.jsonl"), str(root / "*.txt"),
            str(root / "more.jsonl.gz"), str(root / "table.*"),
            str(root / "*.parquet")]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("mixed")
    patterns = _mixed_corpus(root)
    progress = _Capture()
    logger = logging.getLogger("transforms.progress")
    logger.addHandler(progress)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        summary = run([arg for p in patterns for arg in ("--input", p)] + [
            "--output", str(root / "out" / "emb"), "--model", tiny_model_dir,
            "--max_seq_length", str(MAX_SEQ), "--dedup",
            "--max_text_chars", "200", "--write_text",
            "--progress_interval", "0.000001"])
    finally:
        logger.removeHandler(progress)
        logger.setLevel(old_level)
    errors = [json.loads(line) for path in summary.outputs["errors"]
              for line in Path(path).read_text("utf-8").splitlines()]
    return {"summary": summary, "root": root, "errors": errors,
            "progress": progress.lines,
            "emb": load_embeddings(str(root / "out" / "emb-*.parquet"))}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_every_record_is_accounted_for(mixed):
    summary = mixed["summary"]
    c = summary.counts
    assert (c["documents_read"], c["documents_embedded"],
            c["documents_skipped_empty"], c["documents_duplicates"],
            c["documents_unchanged"], c["documents_failed"]) == \
        (22, 11, 2, 2, 0, 7)
    assert summary.reconciled and summary.status == "succeeded"
    written = json.loads((mixed["root"] / "out" / "emb-summary.json")
                         .read_text("utf-8"))
    assert written["counts"] == c and written["reconciled"] is True


def test_dead_letters_name_file_line_reason_and_excerpt(mixed):
    got = sorted((Path(e["source"]).name, e["line"], e["reason"][:40])
                 for e in mixed["errors"])
    assert got == [
        # A file that cannot be read at all is one failed record.
        ("broken.parquet", 1, "file unreadable after record 0: ArrowInv"),
        ("lines.txt", 2, "not valid UTF-8: invalid continuation by"),
        ("news.jsonl", 2, "malformed JSON: Expecting value: line 1 "),
        ("news.jsonl", 3, "missing text field 'text'"),
        ("news.jsonl", 6, "text of 250 characters is over --max_tex"),
        ("rows.parquet", 2, "text field 'text' is NoneType, not a str"),
        ("table.csv", 5, "malformed CSV row: 1 fields, the header "),
    ]
    by_line = {(Path(e["source"]).name, e["line"]): e for e in mixed["errors"]}
    assert by_line[("news.jsonl", 2)]["excerpt"] == '{"id": "n2", "text": '
    assert "bad bytes" in by_line[("lines.txt", 2)]["excerpt"]
    assert by_line[("news.jsonl", 6)]["excerpt"].endswith("…")
    assert by_line[("news.jsonl", 3)]["id"] == "n3"


def test_documents_of_every_format_are_embedded_with_their_text(mixed):
    emb = mixed["emb"]
    line_ids = {derived_id("lines.txt", content_hash(t)): t
                for t in ("客服回复很及时", "北京时间昨晚")}
    expected = {"c1": "房间干净", "c2": "多行\n文本", "c5": SAME,
                "g1": "手机电池续航一般", "g2": "拍照效果不错",
                "p1": "问题解决了", "p3": "服务非常好",
                "t1": "请问订单", "t2": "什么时候发货", **line_ids}
    assert dict(zip(emb.ids, emb.text)) == expected
    assert emb.content_hash == [content_hash(expected[i]) for i in emb.ids]
    # The three equal texts are embedded once, under the smallest id.
    assert "n1" not in emb.ids and "n4" not in emb.ids


def test_progress_lines_report_documents_and_tokens(mixed):
    lines = mixed["progress"]
    assert lines and all(line.startswith("progress: ") for line in lines)
    # Read failures never reach the later stages: 13 sent on + 2 duplicates
    # read; the duplicates are done without the model.
    assert any(re.match(r"progress: 1[3-5] documents done \(11 embedded\), "
                        r"15 read, ", line) and "tokens/s" in line
               for line in lines)
    # A gzip input's decompressed size is unknown: no share, no ETA.
    assert not any("of input" in line or "ETA" in line for line in lines)


def test_gb18030_file(tmp_path, tiny_model_dir):
    corpus = tmp_path / "gb.txt"
    texts = ["今天天气很好", "請問訂單什麼時候發貨", "𠀀字测试"]
    corpus.write_bytes("\ufeff".encode("gb18030")
                       + f"{texts[0]}\n{texts[1]}\n".encode("gb18030")
                       + b"\x81\x20broken\n"
                       + f"{texts[2]}\n".encode("gb18030"))
    summary = run(["--input", str(corpus), "--output", str(tmp_path / "emb"),
                   "--model", tiny_model_dir, "--max_seq_length", "32",
                   "--input_encoding", "gb18030", "--write_text",
                   "--outputs", "pooled"])
    c = summary.counts
    assert (c["documents_read"], c["documents_embedded"],
            c["documents_failed"]) == (4, 3, 1)
    assert summary.reconciled
    emb = load_embeddings(str(tmp_path / "emb-*.parquet"))
    assert sorted(emb.text) == sorted(texts)
    (error,) = [json.loads(line) for line in Path(
        summary.outputs["errors"][0]).read_text("utf-8").splitlines()]
    assert error["line"] == 3
    assert error["reason"].startswith("not valid GB18030")


def test_max_error_rate_fails_the_run_and_publishes_nothing(
        tmp_path, tiny_model_dir, capsys):
    corpus = tmp_path / "half.jsonl"
    _jsonl(corpus, [{"id": "a", "text": "你好"}, "{broken",
                    {"id": "b", "text": "好"}, "[1]"])
    out = tmp_path / "out" / "emb"
    code = main(["--input", str(corpus), "--output", str(out),
                 "--model", tiny_model_dir, "--max_seq_length", "32",
                 "--max_error_rate", "0.25"])
    assert code == EXIT_ERROR_RATE
    err = capsys.readouterr().err
    assert "error rate 50.00% (2 of 4 documents failed) exceeds " \
           "--max_error_rate 25.00%" in err
    published = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(published) == 1 and published[0].startswith("emb.tmp-")
    staged = tmp_path / "out" / published[0]
    manifest = json.loads((staged / "emb-manifest.json").read_text("utf-8"))
    assert manifest["status"] == "failed" and manifest["index"] is None
    assert len((staged / "emb-errors-00000-of-00001.jsonl").read_text(
        "utf-8").splitlines()) == 2
    # The same input under the threshold passes.
    assert main(["--input", str(corpus), "--output", str(out),
                 "--model", tiny_model_dir, "--max_seq_length", "32",
                 "--max_error_rate", "0.5"]) == 0
    assert (tmp_path / "out" / "emb-manifest.json").exists()
    assert not staged.exists()  # the failed run's staging was cleaned
