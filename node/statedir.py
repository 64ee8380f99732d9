"""A daemon's state directory: locked, so two daemons never share one, and holding its libp2p
identity (a key file created with mode 0600 before p2pd starts, so the peer id survives
restarts). hivemind is imported only where a key is made or read: locking the directory, which
the daemon does first so that its control API is up at once, imports nothing heavy.
"""

from __future__ import annotations

import logging
import os

from locoswarm.node.files import leftover_temps, write_atomic
from locoswarm.node.portable import read_head, replace_head, try_lock

log = logging.getLogger(__name__)
IDENTITY_FILE = "identity.key"
LOCK_FILE = "lock"

class NodeError(Exception):
    """A problem the daemon cannot start or go on with; its message says what to do."""


def open_state_dir(path: str) -> int:
    """Create `path` if needed, lock it and make sure it holds a usable identity; returns the
    lock's file descriptor (keep it open)."""
    fd = lock_state_dir(path)
    try:
        ensure_identity(path)
    except NodeError:
        os.close(fd)
        raise
    return fd


def state_dir_peer_id(path: str) -> str:
    """The base58 peer id of state directory `path`'s identity, creating the directory and a
    new identity (under its lock) when it has none: what an organiser names as a trust anchor
    before the anchor's node first starts there. NodeError saying what is wrong."""
    if os.path.exists(os.path.join(path, IDENTITY_FILE)):
        return ensure_identity(path)  # checks the key that is there; a running node may hold the lock
    fd = lock_state_dir(path)
    try:
        return ensure_identity(path)
    finally:
        os.close(fd)


def lock_state_dir(path: str) -> int:
    """Create `path` if needed and lock it, writing our pid into the lock file; returns the
    lock's file descriptor (keep it open). Quick: nothing heavy is imported (the daemon's
    control API comes up right after it, before ensure_identity imports hivemind)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise NodeError(f"state directory {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise NodeError(f"state directory {path}: not readable and writable by this user")
    lock_path = os.path.join(path, LOCK_FILE)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise NodeError(f"state directory {path}: cannot open {lock_path} ({e.strerror})") from None
    if not try_lock(fd):
        owner = read_head(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise NodeError(f"state directory {path} is in use by another running node (pid {owner}); "
                        "give this one its own --state-dir")
    replace_head(fd, str(os.getpid()).encode())
    return fd


def ensure_identity(path: str) -> str:
    """Create the identity key in state directory `path` (locked) if there is none, or check
    the one there; its base58 peer id. NodeError saying what to do when neither works."""
    identity = os.path.join(path, IDENTITY_FILE)
    if not os.path.exists(identity):
        try:
            _create_identity(identity)
        except OSError as e:
            raise NodeError(f"state directory {path}: cannot write the identity file ({e.strerror})") from None
    elif os.stat(identity).st_mode & 0o077:
        log.warning("identity file %s was readable by others: restricting it to its owner (0600)", identity)
        os.chmod(identity, 0o600)
    try:
        with open(identity, "rb") as fh:
            key = fh.read(1 << 16)
        from locoswarm.protocol.dhtrecords import load_identity  # here: the protocol package imports torch

        return load_identity(key).peer_id
    except Exception as e:  # any parse failure: the file is not a key we can use
        raise NodeError(f"identity file {identity} is unreadable or corrupt ({type(e).__name__}); "
                        "it is left as it is: move it away to start with a new peer id") from None


def _create_identity(path: str) -> None:
    """A new libp2p private key (RSA, as hivemind makes them: protocol/dhtrecords.py) at `path`, written by
    files.write_atomic: mode 0600 from its creation (never readable by others, not even for
    a moment), fsynced and renamed, so a crash leaves either no identity or a whole one.
    Called under the state directory's lock, so no other writer is active and a temporary
    key a killed daemon left behind can go."""
    from locoswarm.protocol.dhtrecords import new_identity_file  # here: the protocol package imports torch

    for stale in leftover_temps(path):
        os.unlink(stale)
    write_atomic(path, new_identity_file())


def identity_key(state_dir: str):
    """This peer's libp2p identity as hivemind's RSAPrivateKey, so that the key signing its
    DHT records is the key its peer id is the hash of: a record can then be checked against
    the peer id it names (signers.peer_id_of_owner), not merely against some key."""
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    path = os.path.join(state_dir, IDENTITY_FILE)
    with open(path, "rb") as fh:
        stored = crypto_pb2.PrivateKey.FromString(fh.read(1 << 16))
    if stored.key_type != crypto_pb2.KeyType.RSA:
        raise NodeError(f"identity file {path} holds a {crypto_pb2.KeyType.Name(stored.key_type)} key; records are "
                        "signed with RSA keys: move it away to start with a new peer id")
    key = RSAPrivateKey.__new__(RSAPrivateKey)  # hivemind has no constructor from bytes; this is its unpickling
    key.__setstate__({"_private_key": stored.data})
    return key
