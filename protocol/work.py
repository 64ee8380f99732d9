"""Proof of work on a peer's identity, per run (hashcash, Back 2002, with scrypt, Percival
2009, as the hash): a run whose spec asks for `work_bits` admits a peer only when its record
carries a nonce such that scrypt(run spec hash ‖ peer id ‖ nonce) begins with that many zero
bits. A peer id costs nothing to make; this makes each one cost about 2^bits scrypt
evaluations, paid once per identity and run (the daemon keeps its nonce in the state
directory), while checking one costs a single evaluation, cached by content. scrypt is
memory-hard (1 MiB an evaluation here), so a GPU buys an attacker much less over a CPU than
it would with SHA-256 (docs/hostile-network.md gives the figures measured).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

WORK_SALT = b"locoswarm-work/1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1024, 8, 1
"""scrypt's cost: ≈2 ms an evaluation on one CPU core."""
SCRYPT_MEMORY_BYTES = 128 * SCRYPT_N * SCRYPT_R
"""What one evaluation holds in memory: 1 MiB."""
MAX_WORK_BITS = 32
NONCE_BYTES = 8


def work_digest(spec_hash: bytes, peer_id: str, nonce: int) -> bytes:
    """scrypt of the run spec's hash, the base58 peer id and the nonce (8 bytes, big-endian)."""
    message = spec_hash + peer_id.encode() + nonce.to_bytes(NONCE_BYTES, "big")
    return hashlib.scrypt(message, salt=WORK_SALT, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32,
                          maxmem=4 * SCRYPT_MEMORY_BYTES)


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def meets(spec_hash: bytes, peer_id: str, nonce: int, bits: int) -> bool:
    """Whether `nonce` proves `bits` of work for `peer_id` in the run of `spec_hash`."""
    if bits <= 0:
        return True
    if not 0 <= nonce < 1 << (8 * NONCE_BYTES):
        return False
    return leading_zero_bits(work_digest(spec_hash, peer_id, nonce)) >= bits


def mine(spec_hash: bytes, peer_id: str, bits: int, *, start: int = 0, stop: threading.Event | None = None,
         progress=None, progress_every_s: float = 10.0) -> int | None:
    """The first nonce from `start` on that proves `bits` of work (about 2^bits evaluations);
    None when `stop` was set first. `progress(tries, seconds)` is called every
    `progress_every_s`."""
    if bits <= 0:
        return 0
    nonce, t0 = start, time.monotonic()
    next_report = t0 + progress_every_s
    while True:
        if meets(spec_hash, peer_id, nonce, bits):
            return nonce
        nonce += 1
        if nonce & 15 == 0:
            if stop is not None and stop.is_set():
                return None
            now = time.monotonic()
            if progress is not None and now >= next_report:
                progress(nonce - start, now - t0)
                next_report = now + progress_every_s


class WorkCheck:
    """Verdicts on (peer id, nonce) for one run and difficulty, kept for the last
    `max_entries` identities seen: a record is read again and again, its proof checked once."""

    def __init__(self, spec_hash: bytes, bits: int, *, max_entries: int = 65536) -> None:
        self.spec_hash, self.bits, self.max_entries = spec_hash, bits, max_entries
        self._verdicts: OrderedDict[tuple[str, int], bool] = OrderedDict()
        self.evaluations = 0
        """scrypt evaluations spent checking (cache misses)."""

    def __call__(self, peer_id: str, nonce: int) -> bool:
        key = (peer_id, nonce)
        verdict = self._verdicts.get(key)
        if verdict is None:
            self.evaluations += 1
            verdict = meets(self.spec_hash, peer_id, nonce, self.bits)
            self._verdicts[key] = verdict
            if len(self._verdicts) > self.max_entries:
                self._verdicts.popitem(last=False)
        else:
            self._verdicts.move_to_end(key)
        return verdict
