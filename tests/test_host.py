"""The state directory's identity key: created before p2pd starts, owner-only (0600) from
the first byte, a valid libp2p key, stable across restarts; one found readable by others is
restricted."""

from __future__ import annotations

import os
import stat

from hivemind.p2p import PeerID

from locoswarm.node.files import TEMP_SUFFIX
from locoswarm.node.host import IDENTITY_FILE, open_state_dir


def _open(path) -> int:
    fd = open_state_dir(str(path))
    os.close(fd)  # releases the lock
    return fd


def test_a_new_identity_is_owner_only_and_stable(tmp_path):
    _open(tmp_path / "s")
    key = tmp_path / "s" / IDENTITY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = PeerID.from_identity(key.read_bytes())
    _open(tmp_path / "s")
    assert PeerID.from_identity(key.read_bytes()) == first
    assert not [n for n in os.listdir(tmp_path / "s") if n.endswith(".tmp")]


def test_an_identity_readable_by_others_is_restricted(tmp_path):
    _open(tmp_path / "s")
    key = tmp_path / "s" / IDENTITY_FILE
    os.chmod(key, 0o644)
    _open(tmp_path / "s")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_leftover_temporary_key_from_a_crash_is_replaced(tmp_path):
    state = tmp_path / "s"
    state.mkdir()
    leftover = state / f".{IDENTITY_FILE}.k1ll3d{TEMP_SUFFIX}"  # as files.atomic_path names them
    leftover.write_bytes(b"half a key")
    _open(state)
    PeerID.from_identity((state / IDENTITY_FILE).read_bytes())
    assert sorted(os.listdir(state)) == [IDENTITY_FILE, "lock"]
