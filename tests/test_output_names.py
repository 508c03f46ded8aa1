"""A run touches only its own names: publishing and the clean-up of stale
staging directories leave neighbouring prefixes alone, output prefixes that
would be ambiguous are refused at launch, and publishing refuses staged
files that do not hold what the counts say."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import pipeline.preflight
import pipeline.run
from pipeline.finish import RunFailed, all_output_patterns
from pipeline.lock import OutputLock
from pipeline.publish import clean_stale, publish
from pipeline.read_embeddings import load_index
from transforms.embedding_files import staging_prefix
from pipeline.run import EXIT_USAGE, main, run

TEXTS = ["今天天气很好", "客服回复很及时", "北京时间昨晚", "手机电池续航一般"]
RUN_ID = "20240502T023000Z-4f1c2a"

# Files of runs whose output prefixes start like out/emb, each next to a
# pattern of out/emb's that its names used to match.
NEIGHBOURS = [
    "emb-2024-05-02-00000-of-00001.parquet",  # run at out/emb-2024-05-02
    "emb-2024-05-02-errors-00000-of-00001.jsonl",
    "emb-2024-05-02-index/part-00000-of-00001.parquet",
    "emb-2024-05-02-manifest.json",
    "emb-errors-2024-05-02-errors-00000-of-00001.jsonl",  # out/emb-errors-…
    "emb-errors-00000-of-00001.parquet",  # run at out/emb-errors
    "emb-deleted-2024-00000-of-00001.parquet",  # run at out/emb-deleted-2024
    "emb-deleted-2024-deleted-00000-of-00001.jsonl",
    "emb-index-2-00000-of-00001.parquet",  # run at out/emb-index-2
    "emb-index-2-index/part-00000-of-00001.parquet",
    "emb.tmp-x-00000-of-00001.parquet",  # run at out/emb.tmp-x
    "emb.tmp-x-index/part-00000-of-00001.parquet",
    "emb-documents-2024-00000-of-00001.parquet",  # out/emb-documents-2024
]


def _touch(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_publish_replaces_only_its_own_files(tmp_path):
    out = tmp_path / "out"
    earlier = [f"emb-0000{i}-of-00003.parquet" for i in range(3)] + [
        "emb-errors-00000-of-00001.jsonl", "emb-deleted-00000-of-00001.jsonl",
        "emb-documents-00000-of-00001.parquet",
        "emb-index/part-00000-of-00002.parquet",
        "emb-index/part-00001-of-00002.parquet", "emb-summary.json",
        "emb-manifest.json"]
    _touch(out, NEIGHBOURS + earlier)
    output = str(out / "emb")
    prefix = staging_prefix(output, RUN_ID)
    staged = [prefix + suffix for suffix in (
        "-00000-of-00001.parquet", "-errors-00000-of-00001.jsonl",
        "-index/part-00000-of-00001.parquet", "-summary.json",
        "-manifest.json")]
    for path in staged:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("new")
    publish(staged, prefix, output, all_output_patterns(output), staged[-1])
    assert _files(out) == set(NEIGHBOURS) | {
        "emb-00000-of-00001.parquet", "emb-errors-00000-of-00001.jsonl",
        "emb-index/part-00000-of-00001.parquet", "emb-summary.json",
        "emb-manifest.json"}
    for name in NEIGHBOURS:
        assert (out / name).read_text() == name


def test_clean_stale_takes_only_this_outputs_dead_staging_dirs(tmp_path):
    out = tmp_path / "out"
    dead = ["emb.tmp-20240501T020000Z-1a2b3c",
            "emb.tmp-20240501T030000Z-00ff00"]
    live = "emb.tmp-20240502T020000Z-abcdef"  # holds the output's lock
    own = f"emb.tmp-{RUN_ID}"
    others = [
        "emb.tmp-foo-00000-of-00001.parquet",  # the run at out/emb.tmp-foo
        "emb.tmp-foo-index/part-00000-of-00001.parquet",
        "emb.tmp-foo.tmp-20240501T020000Z-1a2b3c/emb.tmp-foo-00000-of-00001"
        ".parquet",  # ... and its staging directory
        "emb.tmp-notes/readme.txt",  # not a run id
        "emb.tmp-20240501T020000Z-1a2b3c-index/part-00000-of-00001.parquet",
        "emb2.tmp-20240501T020000Z-1a2b3c/emb2-00000-of-00001.parquet",
    ]
    _touch(out, [f"{dead[0]}/emb-00000-of-00001.parquet",
                 f"{live}/emb-00000-of-00001.parquet",
                 f"{own}/emb-00000-of-00001.parquet"] + others)
    (out / dead[1]).mkdir()  # killed before writing anything
    with OutputLock(str(out / "emb"), live.split(".tmp-")[1]):
        removed = clean_stale(str(out / "emb"), RUN_ID)
    assert sorted(Path(d).name for d in removed) == dead
    assert _files(out) == set(others) | {
        f"{live}/emb-00000-of-00001.parquet",
        f"{own}/emb-00000-of-00001.parquet"}


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "c.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"d{i}", "text": t}, ensure_ascii=False) + "\n"
        for i, t in enumerate(TEXTS)), encoding="utf-8")
    return path


def _args(corpus: Path, output: str, model: str, *extra: str) -> list[str]:
    return ["--input", str(corpus), "--output", output, "--model", model,
            "--max_seq_length", "32", "--outputs", "pooled", *extra]


def test_a_run_at_a_shorter_prefix_keeps_the_longer_prefixs_run(
        tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "out"
    dated = run(_args(corpus, str(out / "emb-2024-05-02"), tiny_model_dir))
    before = _files(out)
    run(_args(corpus, str(out / "emb"), tiny_model_dir, "--num_shards", "2"))
    assert before <= _files(out)
    index = load_index(str(out / "emb-2024-05-02-manifest.json"))
    assert index.ids == [f"d{i}" for i in range(len(TEXTS))]
    assert dated.outputs["embeddings"] == [
        str(out / "emb-2024-05-02-00000-of-00001.parquet")]
    assert len(load_index(str(out / "emb-manifest.json"))) == len(TEXTS)


@pytest.mark.parametrize("output", [
    "out/e*b", "out/emb?", "out/[ab]", "out/emb]", "out/run[1]/emb",
    "out/", "out/emb/", ".", "out/..",
    "out/emb-documents", "out/emb-index/part"])
def test_ambiguous_output_prefixes_are_usage_errors(
        output, tmp_path, corpus, tiny_model_dir, monkeypatch, capsys):
    def probe(*args, **kwargs):
        raise AssertionError("the job got past its launch checks")

    monkeypatch.setattr(pipeline.preflight, "probe_model", probe)
    monkeypatch.chdir(tmp_path)
    assert main(_args(corpus, output, tiny_model_dir)) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --output {output}: ") and "\n" not in err
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]  # nothing written


def test_staged_files_that_do_not_match_the_counts_are_not_published(
        tmp_path, corpus, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    collect = pipeline.run.collect_counts

    def one_more(result):
        """Counts one more embedded document than the files hold."""
        counts, loads = collect(result)
        for name in ("documents_read", "documents_embedded",
                     "chunks_embedded"):
            counts[name] += 1
        return counts, loads

    monkeypatch.setattr(pipeline.run, "collect_counts", one_more)
    with pytest.raises(RunFailed, match="hold 4 rows, the counts say 5"):
        run(_args(corpus, str(out / "emb"), tiny_model_dir))
    assert not list(out.glob("emb-*")) and not (out / "emb.lock").exists()

    def staging_gone(result):
        """The staging directory is removed under the run (as another run
        at the same output used to do)."""
        counts, loads = collect(result)
        for staged in out.glob("emb.tmp-*"):
            for path in staged.rglob("*.parquet"):
                path.unlink()
        return counts, loads

    monkeypatch.setattr(pipeline.run, "collect_counts", staging_gone)
    with pytest.raises(RunFailed, match="no embedding file was staged"):
        run(_args(corpus, str(out / "emb"), tiny_model_dir))
    assert not list(out.glob("emb-*"))
