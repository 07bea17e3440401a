"""Publishing results: a failed or interrupted write leaves the previous result (or nothing) and no leftovers."""

import errno
import os

import pytest

from gemma_sft import UserError
from gemma_sft.publish import move_files_into, publish_dir


def write(text):
    def build(folder):
        (folder / "model.bin").write_text(text)
        (folder / "config.json").write_text("{}")

    return build


def test_a_new_folder_appears_whole_and_nothing_else_is_left(tmp_path):
    target = publish_dir(write("new"), tmp_path / "merged")
    assert (target / "model.bin").read_text() == "new"
    plain = tmp_path.parent / f"{tmp_path.name}-plain"
    plain.mkdir()
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not the temporary folder's private mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_failed_build_keeps_the_old_folder_and_leaves_no_partial_one(tmp_path):
    publish_dir(write("old"), tmp_path / "merged")

    def crash(folder):
        (folder / "model.bin").write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        publish_dir(crash, tmp_path / "merged", replace=True)
    assert (tmp_path / "merged" / "model.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_full_disk_is_one_line_and_changes_nothing(tmp_path):
    publish_dir(write("old"), tmp_path / "merged")

    def full(folder):
        (folder / "model.bin").write_text("part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError) as caught:
        publish_dir(full, tmp_path / "merged", replace=True)
    assert "No space left on device" in str(caught.value) and "\n" not in str(caught.value)
    assert (tmp_path / "merged" / "model.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_replace_swaps_in_the_new_folder_and_a_cache_is_built_once(tmp_path):
    publish_dir(write("old"), tmp_path / "merged")
    publish_dir(write("new"), tmp_path / "merged", replace=True)
    assert (tmp_path / "merged" / "model.bin").read_text() == "new"
    built = []
    for _ in range(2):
        publish_dir(lambda folder: built.append(folder), tmp_path / "cache", lock=True)
    assert len(built) == 1
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {"merged", "cache"}
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name or ".old" in p.name]


def test_files_moved_into_a_folder_put_the_completion_marker_last(tmp_path, monkeypatch):
    folder, staging = tmp_path / "out", tmp_path / "out" / ".staging"
    staging.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("old")
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        (staging / name).write_text("new " + name)
    moved, real_replace = [], os.replace

    def replace_then_crash(source, destination):
        if len(moved) == 1:
            raise OSError(errno.EIO, "crash part-way")
        moved.append(os.path.basename(destination))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(OSError):
        move_files_into(staging, folder, last="adapter_config.json")
    # the old marker went first, the new one had not come in: nothing looks like a complete adapter
    assert not (folder / "adapter_config.json").exists() and moved == ["adapter_model.safetensors"]
    monkeypatch.setattr(os, "replace", real_replace)
    move_files_into(staging, folder, last="adapter_config.json")
    assert (folder / "adapter_config.json").read_text() == "new adapter_config.json"
    assert not staging.exists()
