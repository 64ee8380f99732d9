"""node/files.py: an atomic write leaves the old file or the whole new one and no temporary
file; the TOML reader's errors name what was read, the file and the line."""

from __future__ import annotations

import os
import stat

import pytest

from locoswarm.node.files import atomic_path, leftover_temps, read_toml, write_atomic


def test_write_atomic_replaces_text_and_bytes_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "f"
    write_atomic(target, "grüß\n")
    assert target.read_bytes() == "grüß\n".encode()
    write_atomic(str(target), b"\x00\xff")
    assert target.read_bytes() == b"\x00\xff"
    assert os.listdir(tmp_path) == ["f"]


def test_a_writer_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_an_interrupted_write_atomic_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "spec.toml"
    target.write_text("old")

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["spec.toml"]


def test_atomic_path_hands_out_an_owner_only_file_beside_the_target_that_becomes_it(tmp_path):
    target = tmp_path / "identity.key"
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.exists(tmp)
        assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o600
        assert leftover_temps(target) == [tmp]
        with open(tmp, "wb") as fh:
            fh.write(b"key")
    assert target.read_bytes() == b"key" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert leftover_temps(target) == []


def test_leftover_temps_lists_only_the_targets_own(tmp_path):
    (tmp_path / ".a.key.x1.tmp").write_bytes(b"")
    (tmp_path / ".a.keyring.x2.tmp").write_bytes(b"")
    (tmp_path / "a.key.tmp").write_bytes(b"")
    assert leftover_temps(tmp_path / "a.key") == [str(tmp_path / ".a.key.x1.tmp")]


def test_read_toml_returns_the_table(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('a = 1\n[b]\nc = "d"\n')
    assert read_toml(path, "config file") == {"a": 1, "b": {"c": "d"}}


@pytest.mark.parametrize(("body", "message"), [
    (b"a = 1\nb = \n", "not valid TOML: Invalid value (at line 2, column 5)"),
    (b"a = '\xff'\n", "not UTF-8 text"),
])
def test_read_toml_names_what_the_file_and_the_line(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_bytes(body)
    with pytest.raises(ValueError) as e:
        read_toml(path, "run spec")
    assert str(e.value).startswith(f"run spec {path}: ") and message in str(e.value)


def test_read_toml_names_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=f"^config file {tmp_path / 'nope.toml'} does not exist$"):
        read_toml(tmp_path / "nope.toml", "config file")
