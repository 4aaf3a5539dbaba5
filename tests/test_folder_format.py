"""The compressed folder's names and its plan record, read without validating it."""

import json

import pytest

from lowrank.errors import LowrankError
from lowrank.folder_format import PLAN_FILE, is_compressed_folder, read_plan_record, weight_files


def test_a_folder_is_compressed_when_it_holds_a_plan_record(tmp_path):
    assert not is_compressed_folder(tmp_path)
    (tmp_path / PLAN_FILE).write_text(json.dumps({"modules": {}, "files": {"b.safetensors": "ab"}}))
    (tmp_path / "b.safetensors").write_bytes(b"")
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert is_compressed_folder(tmp_path)
    assert [p.name for p in weight_files(tmp_path)] == ["a.safetensors", "b.safetensors"]
    data, files = read_plan_record(tmp_path)
    assert data == {"modules": {}} and files == {"b.safetensors": "ab"}


def test_an_unreadable_record_says_the_folder_is_damaged(tmp_path):
    (tmp_path / PLAN_FILE).write_text("{ not json")
    with pytest.raises(LowrankError, match="the compressed folder is damaged, recompress it"):
        read_plan_record(tmp_path)
