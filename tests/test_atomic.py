"""Atomic outputs: what --force may replace, inputs and the current folder are never replaced, a
failed or terminated write leaves nothing behind, single files are written atomically."""

from __future__ import annotations

import json
import os
import signal

import pytest

from stagcompile.atomic import atomic_dir, write_text_atomic
from stagcompile.errors import StagError, Terminated


def fake_bundle(path):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": "stagcompile-bundle"}))
    (path / "old.txt").write_text("old")
    return path


def fake_checkpoint(path):
    path.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (path / name).write_text("{}")
    return path


def write(path, force=False, what="bundle", sources=()):
    with atomic_dir(path, force, what, sources) as tmp:
        (tmp / "new.txt").write_text("new")


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_force_replaces_only_what_the_stage_writes(tmp_path):
    write(fake_bundle(tmp_path / "b"), force=True)
    assert listing(tmp_path / "b") == ["new.txt"]
    write(fake_checkpoint(tmp_path / "c"), force=True, what="checkpoint")
    assert listing(tmp_path / "c") == ["new.txt"]
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty", force=True)
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    for what in ("bundle", "checkpoint"):
        with pytest.raises(StagError, match=f"home: not a.*--force only replaces a {what}"):
            write(other, force=True, what=what)
    with pytest.raises(StagError, match="not a stagcompile bundle"):
        write(fake_checkpoint(tmp_path / "c2"), force=True)
    with pytest.raises(StagError, match="already exists; pass --force"):
        write(tmp_path / "b")
    assert (other / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c", "c2", "empty", "home"]


def test_never_replaces_an_input_or_the_current_folder(tmp_path, monkeypatch):
    ck = fake_checkpoint(tmp_path / "work" / "ck")
    for target in (ck, tmp_path / "work", tmp_path, ck / ".."):
        with pytest.raises(StagError, match=r"(is|contains) the input .*ck; write the bundle to "
                                            "another folder"):
            write(target, force=True, sources=[ck])
    monkeypatch.chdir(tmp_path / "work")
    for target in (".", "..", str(tmp_path / "work")):
        with pytest.raises(StagError, match="(is|contains) the current folder"):
            write(target, force=True)
    assert listing(tmp_path) == ["work", "work/ck", "work/ck/config.json",
                                 "work/ck/model.safetensors"]


def test_sigterm_while_writing_removes_the_staging_folder(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with atomic_dir(tmp_path / "b", what="bundle") as tmp:
            (tmp / "half.onnx").write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_failed_swap_keeps_the_old_folder_and_leaves_no_old_copy(tmp_path, monkeypatch):
    b = fake_bundle(tmp_path / "b")
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("/b") and ".tmp." in str(src):
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StagError, match="b: cannot write the bundle here .Device or resource busy"):
        write(b, force=True)
    assert listing(tmp_path) == ["b", "b/manifest.json", "b/old.txt"]


def test_write_text_atomic(tmp_path):
    path = tmp_path / "validation" / "report.json"
    write_text_atomic(path, "{}", "validation report")
    assert path.read_text() == "{}"
    blocked = tmp_path / "blocked.json"
    blocked.mkdir()
    with pytest.raises(StagError, match="blocked.json: cannot write the validation report"):
        write_text_atomic(blocked, "{}", "validation report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.json", "validation"]
    assert os.listdir(tmp_path / "validation") == ["report.json"]
