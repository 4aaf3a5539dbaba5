"""Atomic outputs: a folder or file appears whole or not at all, and never over a loaded input."""

import hashlib

import pytest

from lowrank import fileio
from lowrank.errors import LowrankError
from lowrank.fileio import atomic_file, atomic_output_dir, atomic_write_text, check_output_dir, sha256_file


def test_atomic_output_dir_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("fails half-way")
    assert (out / "a.txt").read_text() == "one"  # the old output, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_atomic_file_and_text(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "hello\n")
    assert (tmp_path / "t.txt").read_text() == "hello\n"
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "t.txt") as tmp:
            tmp.write_text("half")
            raise ValueError
    assert (tmp_path / "t.txt").read_text() == "hello\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_outputs_refuse_existing_paths_and_loaded_inputs(tmp_path, monkeypatch):
    (tmp_path / "exists").mkdir()
    with pytest.raises(LowrankError, match="already exists"):
        check_output_dir(tmp_path / "exists", overwrite=False)
    with pytest.raises(LowrankError, match="does not exist; create it first"):
        check_output_dir(tmp_path / "missing" / "out", overwrite=False)
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.setattr(fileio, "LOADED_INPUTS", {model.resolve()})
    with pytest.raises(LowrankError, match="would overwrite or write into the input"):
        atomic_write_text(model / "config.json", "{}")
    with pytest.raises(LowrankError, match="would overwrite or write into the input"):
        check_output_dir(model, overwrite=True)


def test_sha256_file_reads_in_chunks(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()
