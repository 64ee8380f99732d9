"""What a daemon owns on the network on py-libp2p (issue 22; node/network.py's other half):
a py-libp2p host on its trio thread (`TrioP2P`), its part in the swarm's DHT (a node, serving
the DHT's calls with net/dhtserver.py, or with --dht-client a client only) and the registry over
it (net/noderegistry.py). The daemon's round loop, streams and upkeep run on these as they run
on p2pd, in a process that never imports hivemind. As a DHT node it can start a swarm; as a
client it joins one through peers that serve the DHT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Callable

from locoswarm.net.bridge import TrioP2P
from locoswarm.net.dht import DHTClient
from locoswarm.net.dhtserver import DHTServer
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
    async def create(cls, identity_file: bytes, listen: Sequence[str], announce: Sequence[str], *, run_id: str,
                     spec_hash: bytes, ttl_s: float, refuse: Callable[[PeerRecord], str | None] | None,
                     dht_server: bool = True) -> Lp2pNetwork:
        """The host, listening on `listen` (announcing `announce` instead, when given), with a
        DHT client and the registry over it; `join` then bootstraps the client. `dht_server`:
        take part in the DHT as a node (net/dhtserver.py), else as a client only."""
        _quiet_libp2p()
        key_pair, identity = key_pair_of(identity_file)
        p2p = TrioP2P(key_pair, listen, announce=announce)
        await p2p.start()
        client = DHTClient(p2p.host, identity, server=dht_server)
        if dht_server:
            server = DHTServer(client)

            async def serve() -> None:  # on the host's thread, as py-libp2p's handlers are set
                server.serve()
            await p2p.run(serve)
        return cls(p2p, client, BridgedRegistry(p2p, client, run_id, spec_hash, ttl_s=ttl_s, refuse=refuse), [])

    async def join(self, initial_peers: Sequence[str]) -> None:
        """Bootstrap the DHT client from `initial_peers` (none: the first node of a swarm, in
        server mode); DHTUnreachable naming each one's failure when none of them answers as a
        DHT node."""
        await self.p2p.run(self.client.bootstrap, list(initial_peers))
        self.initial_peers = list(initial_peers)
        log.info("py-libp2p host %s joined the DHT through %d peer(s): %d DHT nodes known", self.p2p.peer_id,
                 len(initial_peers), len(self.client.nodes))

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
        """Stop the host (its thread is a daemon thread: one that does not stop within STOP_S
        ends with the process)."""
        try:
            await asyncio.wait_for(self.p2p.shutdown(), STOP_S)
        except asyncio.TimeoutError:
            log.info("the py-libp2p host did not stop within %.0f s", STOP_S)


def _quiet_libp2p() -> None:
    """py-libp2p's own logging, set when it is imported, writes its warnings and errors bare to
    stderr, one for every dial to a peer that has gone and every stream a leaving peer cuts
    (routine in a swarm; the node says what failed in its own words). They go through the
    daemon's handlers instead, and only with --verbose (the root logger at DEBUG)."""
    lp2p = logging.getLogger("libp2p")
    lp2p.propagate = True
    lp2p.setLevel(logging.DEBUG if logging.getLogger().getEffectiveLevel() <= logging.DEBUG else logging.CRITICAL)
