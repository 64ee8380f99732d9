"""The daemon's side of protocol/work.py: the proof of work on this peer's identity that a
run asks for (`access.work_bits`), mined once and kept in the state directory (one file per
run spec), so that a restart, which keeps the identity, does not mine again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from locoswarm.node.files import write_atomic
from locoswarm.protocol.work import SCRYPT_MEMORY_BYTES, meets, mine

log = logging.getLogger(__name__)


def work_path(state_dir: str, spec_hash: bytes) -> str:
    return os.path.join(state_dir, f"work-{spec_hash.hex()[:16]}")


def kept_nonce(state_dir: str, spec_hash: bytes, peer_id: str, bits: int) -> int | None:
    """The nonce kept for this run, if it still proves the work for `peer_id` (a state
    directory whose identity was replaced keeps a nonce of the old one)."""
    try:
        with open(work_path(state_dir, spec_hash)) as f:
            nonce = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return nonce if meets(spec_hash, peer_id, nonce, bits) else None


async def prove_work(state_dir: str, spec_hash: bytes, peer_id: str, bits: int,
                     should_exit: asyncio.Event) -> int | None:
    """The nonce proving `bits` of work for `peer_id` in this run: the kept one, else mined
    now on a thread (about 2^bits scrypt evaluations) and kept. None when `should_exit` was
    set while mining."""
    if bits <= 0:
        return 0
    nonce = kept_nonce(state_dir, spec_hash, peer_id, bits)
    if nonce is not None:
        return nonce
    log.info("this run asks each identity for %d bits of work: about %d scrypt evaluations (%d KiB each), "
             "done once, kept in %s", bits, 2 ** bits, SCRYPT_MEMORY_BYTES >> 10, work_path(state_dir, spec_hash))
    stop = threading.Event()
    watch = asyncio.ensure_future(should_exit.wait())
    watch.add_done_callback(lambda _: stop.set())

    def progress(tries: int, seconds: float) -> None:
        log.info("proving work: %d tries in %.0f s (%d expected)", tries, seconds, 2 ** bits)

    try:
        nonce = await asyncio.get_running_loop().run_in_executor(
            None, lambda: mine(spec_hash, peer_id, bits, stop=stop, progress=progress))
    finally:
        watch.cancel()
    if nonce is None:
        return None
    write_atomic(work_path(state_dir, spec_hash), f"{nonce}\n")
    log.info("work proved: nonce %d", nonce)
    return nonce
