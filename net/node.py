"""What a daemon owns on the network on py-libp2p (issue 22; node/network.py's other half):
a py-libp2p host on its trio thread (`TrioP2P`), the client-mode DHT client that joined the
swarm through its initial peers, and the registry over it (net/noderegistry.py). The daemon's
round loop, streams and upkeep run on these as they run on p2pd, in a process that never
imports hivemind.

A py-libp2p peer joins a swarm, it cannot start one: the DHT it stores its record in and reads
the registry from is served by the p2pd peers (the DHT's server mode is not built here,
docs/windows.md), so at least one p2pd peer must be among its initial peers or reachable from
them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Callable

from locoswarm.net.bridge import TrioP2P
from locoswarm.net.dht import DHTClient, DHTUnreachable
from locoswarm.net.host import key_pair_of
from locoswarm.net.noderegistry import BridgedRegistry
from locoswarm.protocol.records import PeerRecord

log = logging.getLogger(__name__)
STOP_S = 3.0
"""The longest the host may take to stop."""


class Lp2pNetwork:
    """See the module docstring."""

    transport = "libp2p"

    def __init__(self, p2p: TrioP2P, client: DHTClient, registry: BridgedRegistry, initial_peers: list[str]) -> None:
        self.p2p, self.client, self.registry = p2p, client, registry
        self.initial_peers = initial_peers
        """The peers the DHT client bootstrapped from."""

    @classmethod
    async def start(cls, identity_file: bytes, listen: Sequence[str], announce: Sequence[str],
                    attempts: Callable[[], Sequence[str]], *, run_id: str, spec_hash: bytes, ttl_s: float,
                    refuse: Callable[[PeerRecord], str | None] | None, should_stop: asyncio.Event,
                    retry_max_s: float = 30.0) -> Lp2pNetwork | None:
        """The host, listening on `listen` (announcing `announce` instead, when given), then the
        DHT client bootstrapped from the peers `attempts()` names, asked again before each
        attempt, with a pause of 1 s doubling to `retry_max_s` while none answers; None when
        `should_stop` is set first (the host stopped again)."""
        _quiet_libp2p()
        key_pair, identity = key_pair_of(identity_file)
        p2p = TrioP2P(key_pair, listen, announce=announce)
        await p2p.start()
        try:
            client = DHTClient(p2p.host, identity)
            delay = 1.0
            while True:
                initial = list(attempts())
                try:
                    await _unless(p2p.run(client.bootstrap, initial), should_stop)
                    break
                except DHTUnreachable as e:
                    reasons = "; ".join(f"{peer}: {what}" for peer, what in list(client.failures)[-len(initial):])
                    log.warning("none of the initial peers answered (%s); trying again in %.0f s", reasons or e, delay)
                await _unless(asyncio.sleep(delay), should_stop)
                delay = min(2 * delay, retry_max_s)
        except _Stop:
            await p2p.shutdown()
            return None
        except BaseException:
            await p2p.shutdown()
            raise
        log.info("py-libp2p host %s joined the DHT through %d peer(s): %d DHT nodes known", p2p.peer_id,
                 len(initial), len(client.nodes))
        registry = BridgedRegistry(p2p, client, run_id, spec_hash, ttl_s=ttl_s, refuse=refuse)
        return cls(p2p, client, registry, initial)

    def registry_sent(self) -> int:
        """Encoded record bytes stored so far."""
        return self.registry.bytes_stored

    def roll_tasks(self, spec, spec_hash: bytes, peer_id: str, newest, threshold: int) -> list:
        """None: a py-libp2p peer reads the anchors' rolls but keeps and relays none (module
        docstring of net/noderegistry.py); an anchor on it says so."""
        if peer_id in spec.trust.anchors:
            log.warning("this peer is a trust anchor, but on py-libp2p it does not publish its roll: joiners take "
                        "the word of the anchors on p2pd")
        return []

    async def close(self) -> None:
        await asyncio.wait_for(self.p2p.shutdown(), STOP_S)


def _quiet_libp2p() -> None:
    """py-libp2p's own logging, set when it is imported, writes its warnings and errors bare to
    stderr, one for every dial to a peer that has gone and every stream a leaving peer cuts
    (routine in a swarm; the node says what failed in its own words). They go through the
    daemon's handlers instead, and only with --verbose (the root logger at DEBUG)."""
    lp2p = logging.getLogger("libp2p")
    lp2p.propagate = True
    lp2p.setLevel(logging.DEBUG if logging.getLogger().getEffectiveLevel() <= logging.DEBUG else logging.CRITICAL)


class _Stop(Exception):
    pass


async def _unless(aw, should_stop: asyncio.Event):
    """`aw`'s result, or _Stop (with `aw` cancelled) when `should_stop` is set first."""
    task = asyncio.ensure_future(aw)
    stop = asyncio.ensure_future(should_stop.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if not task.done():
        task.cancel()
        raise _Stop
    return task.result()
