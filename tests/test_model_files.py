"""Hashes of model files (``model.files``): kept on disk for local files so
that later processes skip reading them, and never stale after a write."""

from __future__ import annotations

import hashlib
import os

import pytest

from model import files


def _fresh_process(monkeypatch) -> None:
    """Forgets what this process hashed, as a new process would."""
    monkeypatch.setattr(files, "_CACHE", {})


def _blake(paths, names=True) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        if names:
            digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


@pytest.fixture
def weights(tmp_path, monkeypatch):
    monkeypatch.setenv("BERT_ZH_EMBED_CACHE", str(tmp_path / "cache"))
    paths = [str(tmp_path / "variables.data-00000-of-00001"),
             str(tmp_path / "variables.index")]
    for i, path in enumerate(paths):
        with open(path, "wb") as handle:
            handle.write(os.urandom(1000 + i))
    return paths


def test_a_later_process_reads_the_kept_hash_not_the_files(weights,
                                                           monkeypatch):
    first = files.hash_files(weights)
    assert first == _blake(weights)
    _fresh_process(monkeypatch)

    def no_reading(*args, **kwargs):
        raise AssertionError("the files were read again")
    monkeypatch.setattr(files._LocalFiles, "GFile", staticmethod(no_reading))
    assert files.hash_files(weights) == first
    # Names in or out is another hash, not the kept one.
    monkeypatch.undo()
    monkeypatch.setattr(files, "_CACHE", {})
    assert files.hash_files(weights, with_names=False) == _blake(
        weights, names=False)


def test_a_rewritten_file_is_hashed_again_even_with_its_old_mtime(
        weights, monkeypatch):
    """Same size, modification time set back: the change time (and a
    replaced file's inode) still move, so the kept hash is not used."""
    first = files.hash_files(weights)
    stat = os.stat(weights[0])
    with open(weights[0], "r+b") as handle:
        handle.write(b"\xff" * 10)
    os.utime(weights[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _fresh_process(monkeypatch)
    again = files.hash_files(weights)
    assert again != first and again == _blake(weights)
    replacement = weights[1] + ".new"
    with open(replacement, "wb") as handle:
        handle.write(os.urandom(1001))
    os.replace(replacement, weights[1])
    _fresh_process(monkeypatch)
    assert files.hash_files(weights) == _blake(weights)


def test_an_unwritable_cache_only_costs_the_hashing(weights, tmp_path,
                                                    monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    monkeypatch.setenv("BERT_ZH_EMBED_CACHE", str(blocker))
    assert files.hash_files(weights) == _blake(weights)
    _fresh_process(monkeypatch)
    assert files.hash_files(weights) == _blake(weights)


def test_a_corrupt_kept_hash_is_not_trusted(weights, monkeypatch):
    files.hash_files(weights)
    memo = files._memo_path((files._stamp(weights), True))
    with open(memo, "w", encoding="ascii") as handle:
        handle.write("short")
    _fresh_process(monkeypatch)
    assert files.hash_files(weights) == _blake(weights)


def test_files_on_other_file_systems_are_not_kept():
    """Without an inode and change time (``gs://``, ``ram://``) a hash is
    kept for the process only."""
    remote = (("gs://b/m/variables.index", 10, 123),)
    assert files._memo_path((remote, True)) is None
