"""Faulty input that must never embed garbage or vanish silently.

Each class of fault is tried in several variants: compressed streams that
are cut off or corrupt (every compression Beam knows, text/JSONL/CSV), CSV
quotes that do not close, ids that are not strings, text decoded with the
wrong ``--input_encoding`` (and real corpora that must not trip that check),
directories given as ``--input``, and the odd bytes real files hold (NUL
bytes, byte-order marks in the middle, files that vanish or are not what
their suffix says).  Files are read through the reader's own DoFn, outside
a pipeline; the end-to-end runs check the exit code and the counts.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import logging
import lzma
import os
import random
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata

from pipeline.read_embeddings import load_embeddings
from pipeline.run import main
from tests.conftest import SHARED_ASSETS
from transforms.misdecoding import MISDECODED, misdecoded
from transforms.read import (_ParseFile, RecordParser, check_patterns_match,
                             match_input)
from transforms.records import DeadLetter, Document
from transforms.sources import (RawRecord, csv_records, parquet_records,
                                text_records)

CORPUS = SHARED_ASSETS / "corpus"


def read_file(path: Path, input_format: str = "auto",
              encoding: str = "utf-8", max_text_chars: int = 1_000_000
              ) -> tuple[list[Document], list[DeadLetter]]:
    """Everything the reader makes of one file: (documents, dead letters)."""
    parse = _ParseFile(input_format, RecordParser(
        max_text_chars=max_text_chars), encoding)
    size = path.stat().st_size if path.exists() else 0
    out = list(parse.process(fileio.ReadableFile(
        FileMetadata(str(path), size))))
    docs = [item for item in out if isinstance(item, Document)]
    dead = [item.value for item in out if not isinstance(item, Document)]
    assert all(isinstance(d, DeadLetter) for d in dead)
    return docs, dead


# --- compressed streams that break off or are corrupt ------------------------

COMPRESSORS = {
    "gz": gzip.compress,
    "bz2": lambda data: bz2.compress(data, 1),  # 100 kB blocks
    "xz": lzma.compress,
    "zst": zstandard.ZstdCompressor(write_checksum=True).compress,
    "deflate": zlib.compress,
}


def _corpus_texts(count: int) -> list[str]:
    """Distinct texts of varying length from common characters, some with
    commas and quotes (random enough that compressors work in blocks)."""
    pool = [bytes((0xB0 + i // 94, 0xA1 + i % 94)).decode("gb2312")
            for i in range(600)] + [", ", '"', "，", "。"]
    rng = random.Random(13)
    return [f"{i:05d}" + "".join(rng.choice(pool)
                                 for _ in range(rng.randint(5, 80)))
            for i in range(count)]


def _encode(texts: list[str], fmt: str) -> bytes:
    """``texts`` as a text, JSONL or CSV file (ids ``d<i>``)."""
    if fmt == "text":
        lines = texts
    elif fmt == "jsonl":
        lines = [json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False)
                 for i, t in enumerate(texts)]
    else:
        lines = ["id,text"] + ['d{},"{}"'.format(i, t.replace('"', '""'))
                                for i, t in enumerate(texts)]
    return "".join(line + "\n" for line in lines).encode("utf-8")


@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv"])
@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
@pytest.mark.parametrize("cut", [0.35, 0.8])
def test_cut_off_stream_reads_whole_records_then_one_dead_letter(
        tmp_path, fmt, suffix, cut):
    texts = _corpus_texts(6000)
    packed = COMPRESSORS[suffix](_encode(texts, fmt))
    path = tmp_path / f"part.{'txt' if fmt == 'text' else fmt}.{suffix}"
    path.write_bytes(packed[:int(len(packed) * cut)])
    docs, dead = read_file(path)
    # Only whole records, in order, from the start: no cut-off last line.
    assert docs and [d.text for d in docs] == texts[:len(docs)]
    assert len(docs) < len(texts)
    (letter,) = dead
    last = docs[-1].line
    assert letter.line == last + 1
    assert letter.reason.startswith(
        f"file unreadable after record {last}: EOFError: ")


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
@pytest.mark.parametrize("where", [0.3, 0.6, 0.97])
def test_corrupt_stream_is_not_read_at_all(tmp_path, suffix, where):
    packed = bytearray(COMPRESSORS[suffix](_encode(_corpus_texts(3000),
                                                   "jsonl")))
    start = int(len(packed) * where)
    for i in range(start, start + 16):
        packed[i] ^= 0x5A
    path = tmp_path / f"bad.jsonl.{suffix}"
    path.write_bytes(bytes(packed))
    docs, dead = read_file(path)
    # Data before the point where the decompressor noticed may be wrong
    # already: nothing of the file is embedded.
    assert docs == []
    (letter,) = dead
    assert letter.line == 1
    assert letter.reason.startswith("file unreadable after record 0: ")
    assert letter.reason.endswith(
        "(corrupt compressed data: none of the file is read)")


@pytest.mark.parametrize("suffix", ["gz", "bz2", "xz", "zst"])
def test_file_that_is_not_what_its_compression_suffix_says(tmp_path, suffix):
    path = tmp_path / f"plain.txt.{suffix}"
    path.write_text("不是压缩文件\n第二行\n", encoding="utf-8")
    docs, dead = read_file(path)
    assert docs == [] and len(dead) == 1
    assert dead[0].reason.startswith("file unreadable after record 0: ")


def test_concatenated_and_empty_compressed_streams(tmp_path):
    texts = _corpus_texts(10)
    for suffix, pack in COMPRESSORS.items():
        two = pack(_encode(texts[:4], "text")) + pack(
            _encode(texts[4:], "text"))
        (tmp_path / f"two.txt.{suffix}").write_bytes(two)
        docs, dead = read_file(tmp_path / f"two.txt.{suffix}")
        assert ([d.text for d in docs], dead) == (texts, []), suffix
        (tmp_path / f"empty.txt.{suffix}").write_bytes(pack(b""))
        assert read_file(tmp_path / f"empty.txt.{suffix}") == ([], [])


def test_lzo_is_refused_not_read_as_text(tmp_path):
    path = tmp_path / "corpus.txt.lzo"
    path.write_bytes(b"\x89LZO\x00\r\n\x1a\n" + bytes(range(256)))
    docs, dead = read_file(path)
    assert docs == [] and len(dead) == 1
    assert "LZO-compressed files are not supported" in dead[0].reason


# --- CSV quotes that do not close --------------------------------------------


def _csv(data: str, delimiter: str = ",", limit: int = 1 << 20
         ) -> list[RawRecord]:
    return list(csv_records(io.BytesIO(data.encode()), "utf-8", limit,
                            delimiter))


C1, C3, C4 = "c1,房间干净", "c3,服务很好", "c4,价格实惠"
MULTI = 'c5,"多行\n文本"'  # a quoted field that holds a line break


@pytest.mark.parametrize("lines, why", [
    # A stray quote that never closes: it used to swallow the rest of the
    # file into one document.
    ([C1, MULTI, 'c2,"说明书丢了', C3, C4],
     "a quoted field in it is not closed before the end of the file"),
    # One that the next quote in the file "closes", with text after it.
    ([C1, 'c2,"说明书丢了', C3, C4, MULTI],
     "a quoted field in it is not closed properly ('{d}' expected after "
     "'\"' on line 6)"),
    # On the last line.
    ([C1, MULTI, C3, C4, 'c2,"最后一行没有闭合'],
     "a quoted field in it is not closed before the end of the file"),
    # Closed on its own line, with text after it (csv used to drop the
    # quotes and keep the text).
    ([C1, 'c2,"说明书"丢了', C3, MULTI, C4], "'{d}' expected after '\"'"),
])
@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_csv_unclosed_quote_costs_one_row_not_the_rest(lines, why,
                                                       delimiter):
    lines = [line.replace(",", delimiter, 1) for line in lines]
    why = why.format(d=delimiter)
    bad = next(line for line in lines if line.startswith("c2"))
    data = f"id{delimiter}text\n" + "\n".join(lines) + "\n"
    records = _csv(data, delimiter)
    fields = sorted((r.fields["id"], r.fields["text"]) for r in records
                    if r.fields)
    assert fields == [("c1", "房间干净"), ("c3", "服务很好"), ("c4", "价格实惠"),
                      ("c5", "多行\n文本")]
    (error,) = [r for r in records if r.error]
    assert error.line == data.split("\n").index(bad) + 1
    assert error.excerpt == bad
    assert error.error.startswith(f"malformed CSV row: {why}")
    if "not closed" in why and bad != lines[-1]:
        assert error.error.endswith(
            "; the lines after this one are read again as rows")
    # Every byte but the header's is credited to exactly one record.
    assert sum(r.nbytes for r in records) == len(data.encode()) - 8


def test_csv_quoted_field_over_the_row_limit_is_read_again_linewise():
    data = ('id,text\nc1,"开头\n' + "".join(f"x{i},正文{i}\n"
                                           for i in range(40))
            + "c2,结尾\n")
    records = _csv(data, limit=200)
    assert records[0].line == 2 and "not closed within 200 bytes" in \
        records[0].error
    assert [r.fields["id"] for r in records[1:]] == \
        [f"x{i}" for i in range(40)] + ["c2"]
    assert sum(r.nbytes for r in records) == len(data.encode()) - 8


@pytest.mark.parametrize("data, reason", [
    ('"id,text\nc1,好\n'.encode(),
     "a quoted field in it is not closed before the end of the file"),
    ('"id"x,text\nc1,好\n'.encode(), "',' expected after '\"'"),
    (b"id,te\xffxt\nc1,ok\n", "not valid UTF-8"),
    (b"id,text\x00\nc1,ok\n", "line holds NUL bytes"),
])
def test_csv_header_that_cannot_be_read_fails_the_file(tmp_path, data,
                                                        reason):
    # The old reader took the first data row for the header instead, or
    # named the columns with the broken text.
    path = tmp_path / "table.csv"
    path.write_bytes(data)
    docs, dead = read_file(path)
    assert docs == [] and len(dead) == 1
    assert dead[0].reason.startswith(
        "file unreadable after record 0: ValueError: CSV header (line 1): "
        + reason)


def test_csv_blank_lines_before_the_header_are_skipped():
    records = _csv("\n\nid,text\nc1,好\n")
    assert [(r.line, r.fields) for r in records] == [
        (4, {"id": "c1", "text": "好"})]


# --- ids that are not strings ------------------------------------------------


def _parse_json(value, id_field="id"):
    record = RawRecord(3, 10, text=json.dumps(
        {id_field: value, "text": "你好"}, ensure_ascii=False))
    return RecordParser(id_field=id_field).parse("x.jsonl", "jsonl", record)


@pytest.mark.parametrize("value, expected", [
    ("a-1", "a-1"), ("007", "007"), (42, "42"), (-7, "-7"),
    (12345678901234567890123, "12345678901234567890123"),
    (3.0, "3"), (-0.0, "0"), (2.0**53, str(2**53))])
def test_string_and_integer_ids_are_kept(value, expected):
    doc = _parse_json(value)
    assert isinstance(doc, Document) and doc.id == expected


@pytest.mark.parametrize("value, kind", [
    ({"a": 1}, "an object"), ([1, 2], "an array"), ([], "an array"),
    (True, "a boolean"), (False, "a boolean"),
    (3.5, "a number with a fraction or out of range"),
    (1e300, "a number with a fraction or out of range"),
    (float("nan"), "a number with a fraction or out of range")])
def test_other_ids_are_dead_letters(value, kind):
    dead = _parse_json(value)
    assert isinstance(dead, DeadLetter)
    assert dead.reason.startswith(f"id field 'id' is {kind} (")
    assert dead.reason.endswith("), not a string or an integer")
    assert len(dead.reason) < 120


def test_nested_id_field_and_null_id():
    parser = RecordParser(id_field="meta.id")
    parse = lambda fields: parser.parse(  # noqa: E731
        "x.jsonl", "jsonl", RawRecord(1, 1, text=json.dumps(fields)))
    assert parse({"meta": {"id": 5}, "text": "好"}).id == "5"
    assert parse({"meta": {"id": None}, "text": "好"}).id.startswith(
        "x.jsonl:")
    assert parse({"meta": {"id": [5]}, "text": "好"}).reason.startswith(
        "id field 'meta.id' is an array")


def test_parquet_id_and_text_columns_of_other_types(tmp_path):
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({
        "int_id": pa.array([7, 8, 9], pa.int64()),
        "float_id": [1.0, 2.5, None],
        "struct_id": [{"a": 1}, {"a": 2}, {"a": 3}],
        "list_id": [[1], [2], [3]],
        "time_id": pa.array([0, 1, 2], pa.timestamp("s")),
        "text": ["甲", "乙", "丙"],
        "bytes_text": [b"a", b"b", b"c"],
    }), path)

    def parse(id_field: str, text_field: str = "text") -> list:
        parser = RecordParser(id_field=id_field, text_field=text_field)
        with path.open("rb") as handle:
            return [parser.parse(str(path), "parquet", r) for r in
                    parquet_records(handle, path.stat().st_size,
                                    (id_field, text_field))]

    assert [d.id for d in parse("int_id")] == ["7", "8", "9"]
    floats = parse("float_id")
    assert floats[0].id == "1" and floats[2].id.startswith("typed.parquet:")
    assert floats[1].reason.startswith("id field 'float_id' is a number")
    for field, kind in (("struct_id", "an object"), ("list_id", "an array"),
                        ("time_id", "datetime")):
        assert all(isinstance(d, DeadLetter) and d.reason.startswith(
            f"id field '{field}' is {kind}") for d in parse(field)), field
    assert all(d.reason == "text field 'bytes_text' is bytes, not a string"
               for d in parse("int_id", "bytes_text"))


# --- text decoded with the wrong encoding ------------------------------------

# Sentences whose UTF-8 bytes happen to decode as GB18030 too (most do not,
# and those become "not valid GB18030" dead letters).
UTF8_AS_GB = ["房间干净整洁，位置也好，就是缺少电梯", "老师布置的作业有点多",
              "今天下午会议室有人使用吗", "城市的夜景真的太美了", "孩子们在操场上踢足球"]
SIMPLIFIED = UTF8_AS_GB + ["早餐品种很少，服务员态度一般", "我们明天上午九点在公司门口集合",
                           "快递速度很快，包装也很结实", "周末我们一起去爬山吧"]
TRADITIONAL = ["請問訂單什麼時候發貨？", "這家飯店的服務非常好，房間乾淨。",
               "今天天氣很好，我們去公園散步。", "客服回覆很及時，問題解決了。",
               "他說這本書寫得很有意思，值得一讀。"]


def _lines_as(texts: list[str], fmt: str) -> list[str]:
    if fmt == "text":
        return texts
    return [json.dumps({"id": f"x{i}", "text": t}, ensure_ascii=False)
            for i, t in enumerate(texts)]


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
@pytest.mark.parametrize("written, read, texts", [
    ("utf-8", "gb18030", UTF8_AS_GB),
    ("utf-8", "gbk", UTF8_AS_GB),
    ("big5", "gb18030", TRADITIONAL),
    ("big5", "gbk", TRADITIONAL),
    ("gbk", "big5", SIMPLIFIED),
    ("gb18030", "big5", SIMPLIFIED),
    ("utf-8", "big5", SIMPLIFIED + TRADITIONAL),
])
def test_wrong_encoding_never_embeds_mojibake(fmt, written, read, texts):
    lines = _lines_as(texts, fmt)
    data = "".join(line + "\n" for line in lines).encode(written)
    records = list(text_records(io.BytesIO(data), read, 1 << 20, False))
    assert len(records) == len(lines)
    for line, record in zip(lines, records):
        try:  # the old reader embedded these lines as garbage
            (line + "\n").encode(written).decode(read)
            expected = MISDECODED
        except UnicodeDecodeError:
            expected = "not valid "
        assert record.error and record.error.startswith(expected), line


@pytest.mark.parametrize("written", ["utf-16-be", "utf-8", "gb18030"])
@pytest.mark.parametrize("text", SIMPLIFIED + TRADITIONAL)
def test_utf16_read_in_the_wrong_byte_order_or_from_8_bit_bytes(written,
                                                                text):
    """``--input_encoding utf-16`` assumes little-endian without a BOM: a
    big-endian file (or an 8-bit one) has no line break in that reading, so
    each file is one record, and it must be a dead letter."""
    data = (text + "\n").encode(written)
    if len(data) % 2:
        data += b"\n"
    (record,) = text_records(io.BytesIO(data), "utf-16", 1 << 20, False)
    try:
        data.decode("utf-16-le")
        expected = MISDECODED
    except UnicodeDecodeError:  # holds a lone surrogate
        expected = "not valid UTF-16"
    assert record.error.startswith(expected)
    assert expected != MISDECODED or record.error.endswith(
        "check --input_encoding")


def test_over_long_mis_decoded_line_says_so():
    data = "\n".join(SIMPLIFIED * 20).encode("utf-16-be")
    (record,) = text_records(io.BytesIO(data), "utf-16", 1000, False)
    assert record.error.startswith(MISDECODED)
    assert f"(line of {len(data)} bytes is over the 1000-byte limit)" in \
        record.error


def test_csv_rows_and_header_are_checked_too():
    data = ("id,text\n" + "".join(f"c{i},{t}\n" for i, t in
                                  enumerate(TRADITIONAL))).encode("big5")
    records = list(csv_records(io.BytesIO(data), "gb18030", 1 << 20, ","))
    assert records and all(r.error.startswith(MISDECODED) for r in records)
    header = "编号,正文\n".encode("utf-8") + "c1,好\n".encode("utf-8")
    with pytest.raises(ValueError, match="CSV header"):
        list(csv_records(io.BytesIO(header), "gb18030", 1 << 20, ","))


def test_mis_decoded_file_logs_one_summary_line(tmp_path, caplog):
    path = tmp_path / "reviews.txt"
    path.write_bytes("".join(t + "\n" for t in TRADITIONAL + ["好"])
                     .encode("big5"))
    with caplog.at_level(logging.WARNING, logger="transforms.read"):
        docs, dead = read_file(path, encoding="gb18030")
    assert len(dead) == len(TRADITIONAL) and len(docs) == 1
    assert all(d.reason.startswith(MISDECODED) for d in dead)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "transforms.read"]
    assert warnings == [f"{path}: {len(TRADITIONAL)} of "
                        f"{len(TRADITIONAL) + 1} records look mis-decoded "
                        "as gb18030: check --input_encoding"]


# Real text the check must leave alone: classical Chinese, emoticons,
# full-width letters, kana, Hangul, Greek, symbols, rare characters.
REAL_TEXTS = [
    "子曰：學而時習之，不亦說乎？有朋自遠方來，不亦樂乎？",
    "如是我聞：一時，佛住舍衛國祇樹給孤獨園。",
    "太坑了（╯‵□′）╯︵┻━┻ 再也不买了！！！",
    "好评～～ヽ(✿ﾟ▽ﾟ)ノ 物流超快 ^_^ 😂👍",
    "ＡＢＣ１２３，全角字符和半角abc混排",
    "α粒子与β衰变；温度３０℃，面积50㎡，①②③",
    "東京の天気は晴れです；서울은 비가 옵니다；北京多云",
    "《红楼梦》第一回：甄士隐梦幻识通灵，贾雨村风尘怀闺秀",
    "𠀀𠀁字测试，生僻字：犇猋骉麤",
    "Python是一种编程语言，version 3.11。",
]


def _check_real(texts: list[str], codecs_to_try: list[str]) -> None:
    for codec in codecs_to_try:
        lines = []
        for text in texts:
            try:
                text.encode(codec)
            except UnicodeEncodeError:
                continue  # Big5 cannot write simplified characters
            lines.append(text.replace("\n", " "))
        assert lines, codec
        bom = {"utf-16-le": codecs.BOM_UTF16_LE,
               "utf-16-be": codecs.BOM_UTF16_BE}.get(codec, b"")
        data = bom + "".join(t + "\n" for t in lines).encode(codec)
        encoding = "utf-16" if bom else codec
        records = list(text_records(io.BytesIO(data), encoding, 1 << 22,
                                    False))
        wrong = [(r.line, r.error) for r in records if r.error]
        assert wrong == [], (codec, wrong[:5])
        assert [r.text for r in records] == lines


CODECS = ["utf-8", "gb18030", "gbk", "big5", "utf-16-le", "utf-16-be"]


def test_real_texts_are_never_taken_for_mis_decoded():
    _check_real(REAL_TEXTS, CODECS)


@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared corpora not present")
@pytest.mark.parametrize("name", ["zh_public_domain", "clue_news_web_sample",
                                  "chnsenticorp_reviews"])
def test_real_corpora_produce_no_false_positives(name):
    path = CORPUS / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    with path.open(encoding="utf-8") as handle:
        lines = [line.rstrip("\n") for line in handle]
    texts = [json.loads(line)["text"] for line in lines]
    _check_real(lines, CODECS)  # whole JSON lines, as the reader sees them
    # The check itself, on the bare texts, with every encoding's
    # alternatives (UTF-8 included, which the reader never checks).
    for codec in ("gb18030", "big5", "utf-16-le", "utf-16-be"):
        flagged = []
        for text in texts:
            try:
                raw = text.encode(codec)
            except UnicodeEncodeError:
                continue
            if misdecoded(raw, text, codec):
                flagged.append(text[:40])
        assert flagged == [], (codec, flagged[:5])


# --- odd bytes and odd files -------------------------------------------------


def test_byte_order_mark_at_the_start_of_any_line_is_dropped(tmp_path):
    # ``cat a.jsonl b.jsonl`` of files saved with a BOM.
    first = codecs.BOM_UTF8 + '{"id": "a", "text": "甲"}\n'.encode()
    second = codecs.BOM_UTF8 + '{"id": "b", "text": "乙"}\n'.encode()
    (tmp_path / "joined.jsonl").write_bytes(first + second)
    docs, dead = read_file(tmp_path / "joined.jsonl")
    assert ([(d.id, d.text) for d in docs], dead) == (
        [("a", "甲"), ("b", "乙")], [])
    both = "id,text\nc1,甲\n".encode("utf-16-le")
    (tmp_path / "joined.csv").write_bytes(
        codecs.BOM_UTF16_LE + both + codecs.BOM_UTF16_LE
        + "c2,乙\n".encode("utf-16-le"))
    docs, dead = read_file(tmp_path / "joined.csv", encoding="utf-16")
    assert [(d.id, d.text) for d in docs] == [("c1", "甲"), ("c2", "乙")]


@pytest.mark.parametrize("fmt, data", [
    ("text", "好\n坏\x00坏\n好\n"),
    ("jsonl", '{"id": "a", "text": "好"}\n\x00\x00\x00\n'
              '{"id": "b", "text": "好"}\n'),
    ("csv", "id,text\na,好\nb,坏\x00\nc,好\n"),
])
def test_nul_bytes_are_dead_letters(tmp_path, fmt, data):
    path = tmp_path / f"nul.{'txt' if fmt == 'text' else fmt}"
    path.write_text(data, encoding="utf-8")
    docs, dead = read_file(path)
    assert len(docs) == 2 and all(d.text == "好" for d in docs)
    (letter,) = dead
    assert letter.reason.startswith("line holds NUL bytes")


def test_utf16_file_read_as_utf8_is_dead_letters(tmp_path):
    path = tmp_path / "wide.txt"
    path.write_bytes(codecs.BOM_UTF16_LE + "abc\nxyz\n".encode("utf-16-le"))
    docs, dead = read_file(path)
    assert docs == [] and len(dead) >= 2


@pytest.mark.parametrize("name, data", [
    ("empty.txt", b""), ("empty.jsonl", b""), ("empty.csv", b""),
    ("header_only.csv", b"id,text\n"), ("blank.jsonl", b"\n\n  \n")])
def test_empty_files_have_no_records(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    assert read_file(tmp_path / name) == ([], [])


@pytest.mark.parametrize("name, data", [
    ("empty.parquet", b""), ("text.parquet", "今天天气很好\n".encode()),
    ("cut.parquet", None)])
def test_parquet_file_that_is_not_parquet(tmp_path, name, data):
    path = tmp_path / name
    if data is None:  # a real Parquet file, cut in half
        pq.write_table(pa.table({"text": ["好"] * 100}), path)
        data = path.read_bytes()[:path.stat().st_size // 2]
    path.write_bytes(data)
    docs, dead = read_file(path)
    assert docs == [] and len(dead) == 1
    assert dead[0].reason.startswith("file unreadable after record 0: ")


def test_file_that_vanishes_before_it_is_read(tmp_path):
    docs, dead = read_file(tmp_path / "gone.jsonl")
    assert docs == [] and len(dead) == 1
    assert dead[0].reason.startswith(
        "file unreadable after record 0: FileNotFoundError")


# --- directories as --input --------------------------------------------------


def _corpus_dir(root: Path) -> Path:
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.jsonl").write_text('{"id": "a1", "text": "今天天气很好"}\n',
                                    encoding="utf-8")
    (corpus / "b.txt").write_text("客服回复很及时\n", encoding="utf-8")
    with gzip.open(corpus / "c.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write('{"id": "c1", "text": "北京时间昨晚"}\n')
    (corpus / "sub" / "d.txt").write_text("房间干净\n", encoding="utf-8")
    (corpus / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (corpus / "_SUCCESS").write_bytes(b"")
    # A user's file that merely ends like a manifest is read.
    (corpus / "notes-manifest.json").write_text(
        '{"id": "n1", "text": "请问订单"}\n', encoding="utf-8")
    return corpus


def _names(files, root: Path) -> list[str]:
    return sorted(os.path.relpath(f.path, root) for f in files)


def test_directory_stands_for_the_files_directly_inside(tmp_path):
    corpus = _corpus_dir(tmp_path)
    top = ["a.jsonl", "b.txt", "c.jsonl.gz", "notes-manifest.json"]
    for pattern in (str(corpus), str(corpus) + "/"):
        assert _names(match_input(pattern), corpus) == top
        assert _names(check_patterns_match([pattern]), corpus) == top
    # A glob matches as Beam matches it: ``**`` reaches subdirectories.
    assert "sub/d.txt" in _names(match_input(str(corpus / "**")), corpus)
    assert _names(match_input(str(corpus / "*.txt")), corpus) == ["b.txt"]


def test_directory_skips_lease_files_of_runs_writing_there(tmp_path):
    """A run writing into its own input directory holds ``<output>.lock``
    there from launch on (before any manifest): it is not input; a user's
    file that merely ends in ``.lock`` is."""
    from pipeline.lock import OutputLock
    corpus = _corpus_dir(tmp_path)
    (corpus / "mine.lock").write_text('{"id": "l1", "text": "锁"}\n',
                                      encoding="utf-8")
    with OutputLock(str(corpus / "emb"), "20240501T020000Z-abcdef"):
        assert (corpus / "emb.lock").exists()
        assert _names(match_input(str(corpus)), corpus) == [
            "a.jsonl", "b.txt", "c.jsonl.gz", "mine.lock",
            "notes-manifest.json"]


def test_directory_without_files_to_read_fails_at_launch(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".keep").write_bytes(b"")
    for name in ("empty", "hidden"):
        with pytest.raises(FileNotFoundError,
                           match="--input matched no files"):
            check_patterns_match([str(tmp_path / name)])


def test_directory_input_end_to_end_skips_earlier_outputs(tmp_path,
                                                         tiny_model_dir):
    corpus = _corpus_dir(tmp_path)
    for run_no in (1, 2):
        # The second run reads the directory that now holds the first
        # run's outputs (and writes there again): they are not input.
        assert main(["--input", str(corpus), "--output", str(corpus / "emb"),
                     "--model", tiny_model_dir, "--max_seq_length", "32",
                     "--outputs", "pooled"]) == 0, run_no
        summary = json.loads((corpus / "emb-summary.json").read_text("utf-8"))
        c = summary["counts"]
        assert (c["documents_read"], c["documents_embedded"],
                c["documents_failed"]) == (4, 4, 0), run_no
        ids = load_embeddings(str(corpus / "emb-*.parquet")).ids
        assert sorted(i for i in ids if not i.startswith("b.txt:")) == [
            "a1", "c1", "n1"] and len(ids) == 4


def test_faulty_files_end_to_end_exit_0_and_reconcile(tmp_path,
                                                      tiny_model_dir):
    corpus = tmp_path / "in"
    corpus.mkdir()
    texts = _corpus_texts(3000)
    packed = gzip.compress(_encode(texts, "jsonl"))
    (corpus / "cut.jsonl.gz").write_bytes(packed[:len(packed) // 2])
    (corpus / "quotes.csv").write_text(
        'id,text\nq1,好\nq2,"没闭合\nq3,坏\n', encoding="utf-8")
    (corpus / "ids.jsonl").write_text(
        '{"id": {"a": 1}, "text": "好"}\n{"id": 7, "text": "好好"}\n'
        '{"id": true, "text": "好好好"}\n', encoding="utf-8")
    out = tmp_path / "out" / "emb"
    assert main(["--input", str(corpus), "--output", str(out),
                 "--model", tiny_model_dir, "--max_seq_length", "32",
                 "--outputs", "pooled", "--max_error_rate", "1"]) == 0
    summary = json.loads((tmp_path / "out" / "emb-summary.json")
                         .read_text("utf-8"))
    c = summary["counts"]
    whole = c["documents_read"] - 1 - 3 - 3  # cut's letter, csv, ids
    assert 0 < whole < len(texts)
    assert (c["documents_failed"], c["documents_embedded"]) == (
        1 + 1 + 2, whole + 2 + 1)
    assert summary["reconciled"] is True
    errors = sorted((Path(e["source"]).name, e["line"], e["reason"])
                    for path in (tmp_path / "out").glob("emb-errors-*.jsonl")
                    for e in map(json.loads,
                                 path.read_text("utf-8").splitlines()))
    assert [(name, line) for name, line, _ in errors] == [
        ("cut.jsonl.gz", whole + 1), ("ids.jsonl", 1), ("ids.jsonl", 3),
        ("quotes.csv", 3)]
    assert errors[0][2].startswith(
        f"file unreadable after record {whole}: EOFError: ")
    assert errors[1][2].startswith("id field 'id' is an object")
    assert errors[2][2].startswith("id field 'id' is a boolean")
    assert errors[3][2].startswith("malformed CSV row: a quoted field")
