"""What a daemon owns on the network, started and stopped together, on either transport: the
host its streams run on (`p2p`), the peer registry (`registry`), the initial peers it joined
through, and the anchors' roll tasks. The daemon (node/daemon.py) and the round loop use these
alone, so the one round loop runs on both:

- `P2pdNetwork` (here): hivemind's p2pd, a hivemind DHTNode on the daemon's loop, and the
  bounded registry of node/registry.py. Linux and macOS, where hivemind installs.
- `Lp2pNetwork` (net/node.py): a py-libp2p host on a trio thread (net/bridge.py TrioP2P),
  its DHT node (net/dhtserver.py; a client only with --dht-client) and the registry of
  net/noderegistry.py, in a process that never imports hivemind. Windows, and `--transport
  libp2p` anywhere.

`start_network` picks by `NetworkConfig.transport` ("auto": p2pd where hivemind is installed,
else py-libp2p; node/portable.py says which one this machine has).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Callable

from locoswarm.node.config import NodeConfig
from locoswarm.node.host import DHT_OPTIONS, Dialling, NodeError, listen_addresses, start_p2p, stop_p2p
from locoswarm.node.lifecycle import STOP_STEP_S, unless_stopped
from locoswarm.node.spec import RunSpec
from locoswarm.node.statedir import IDENTITY_FILE, identity_key
from locoswarm.protocol.records import PeerRecord

log = logging.getLogger(__name__)


LP2P_NEEDS_PEERS = ("a peer on the libp2p transport with --dht-client joins a swarm, it cannot start one (its DHT "
                    "is served by other peers): give --peer with the address of a peer of the swarm")


def lp2p_cannot_start(cfg: NodeConfig) -> str | None:
    """Why `cfg` cannot start a peer on py-libp2p (LP2P_NEEDS_PEERS: a DHT client with no
    initial peer and none seen last time), None when it can or runs on p2pd. Asked before the
    state directory is made."""
    from locoswarm.node import ports
    from locoswarm.node.portable import transport_of

    if transport_of(cfg.net.transport) != "libp2p" or not cfg.net.dht_client or cfg.net.peers or \
            ports.seen_peers(cfg.state_dir):
        return None
    return LP2P_NEEDS_PEERS


class NetworkStopped(Exception):
    """A stop came while the network was starting: what had started is stopped again."""


class P2pdNetwork:
    """p2pd, the DHT node on the daemon's loop and the registry over it (module docstring)."""

    transport = "p2pd"

    def __init__(self, p2p, dht, registry, validator, initial_peers: list[str]) -> None:
        self.p2p, self.dht, self.registry, self.validator = p2p, dht, registry, validator
        self.initial_peers = initial_peers
        """The peers p2pd bootstrapped from: the given ones, and those seen last time if none answered."""

    @classmethod
    async def start(cls, cfg: NodeConfig, spec: RunSpec, spec_hash: bytes, *, should_stop: asyncio.Event,
                    dialling: Dialling, refuse: Callable[[PeerRecord], str | None] | None) -> P2pdNetwork | None:
        """p2pd (start_p2p: its retries while the initial peers cannot be reached), then the
        DHT node and the registry; None when `should_stop` is set before p2pd is up,
        NetworkStopped when it is set while the DHT node starts."""
        from hivemind.dht.node import DHTNode

        from locoswarm.node.registry import PeerRegistry
        from locoswarm.node.signers import CachedSignatureValidator

        started = await start_p2p(cfg.state_dir, cfg.net, should_stop, dialling)
        if started is None:
            return None
        p2p, initial_peers = started
        try:
            validator = CachedSignatureValidator(identity_key(cfg.state_dir))
            done, dht = await unless_stopped(DHTNode.create(
                p2p=p2p, initial_peers=initial_peers or None, record_validator=validator,
                client_mode=cfg.net.dht_client, **DHT_OPTIONS), should_stop)
            if not done:
                raise NetworkStopped
            dialling.since = None  # the DHT reached its initial peers too
            registry = PeerRegistry(dht, spec.run_id, spec_hash, ttl_s=cfg.record_ttl_s, validator=validator,
                                    refuse=refuse, read_period_s=cfg.record_ttl_s / 3,
                                    peer_id=p2p.peer_id.to_base58())
        except BaseException:
            await stop_p2p(p2p)
            raise
        return cls(p2p, dht, registry, validator, initial_peers)

    def registry_sent(self) -> int:
        """Signed registry entry bytes stored at other replicas so far (node/replicas.py)."""
        return self.registry.store.bytes_stored

    def roll_tasks(self, spec: RunSpec, spec_hash: bytes, peer_id: str, newest, threshold: int) -> list:
        """The anchors' rolls (node/roll.py): an anchor keeps its own; every peer relays the
        rolls it reads to the roll key's replicas."""
        from locoswarm.node.roll import keep_roll, relay_rolls

        tasks = []
        if peer_id in spec.trust.anchors:
            tasks.append(keep_roll(self.dht, peer_id.encode() + self.validator.local_public_key, spec.run_id,
                                   spec_hash, newest, threshold))
        tasks.append(relay_rolls(self.registry.store, spec.run_id, spec_hash, spec.trust.anchors,
                                 lambda: self.registry.peers_estimate, random.Random()))
        return tasks

    async def close(self) -> None:
        """Stop the DHT node (it only unregisters its handlers from p2pd), then p2pd."""
        try:
            await asyncio.wait_for(self.dht.shutdown(), STOP_STEP_S / 2)
        except Exception as e:  # leaving anyway (a timeout among them): p2pd's end closes its streams
            log.info("the DHT did not stop cleanly: %s", type(e).__name__)
        await stop_p2p(self.p2p)


async def start_network(cfg: NodeConfig, spec: RunSpec, spec_hash: bytes, *, should_stop: asyncio.Event,
                        dialling: Dialling, refuse: Callable[[PeerRecord], str | None] | None):
    """The network of `cfg.net.transport` (module docstring), started; None when stopped
    before it was up."""
    from locoswarm.node.portable import transport_of

    if transport_of(cfg.net.transport) == "libp2p":
        return await _start_lp2p(cfg, spec, spec_hash, should_stop=should_stop, dialling=dialling, refuse=refuse)
    return await P2pdNetwork.start(cfg, spec, spec_hash, should_stop=should_stop, dialling=dialling, refuse=refuse)


async def _start_lp2p(cfg: NodeConfig, spec: RunSpec, spec_hash: bytes, *, should_stop: asyncio.Event,
                      dialling: Dialling, refuse: Callable[[PeerRecord], str | None] | None):
    """net/node.py's Lp2pNetwork on the settings p2pd would take: the listen addresses (TCP
    only: py-libp2p's QUIC has not been tried against p2pd), the ports kept from the last run,
    the initial peers and, after a first failed attempt, the peers seen last time."""
    from locoswarm.net.dht import DHTUnreachable  # only here: py-libp2p and hivemind never share a process
    from locoswarm.net.node import Lp2pNetwork
    from locoswarm.node import ports

    net = cfg.net
    listen = [a for a in net.listen if "/tcp/" in a]
    if len(listen) < len(net.listen):
        log.info("py-libp2p listens on TCP only: %s left out", ", ".join(a for a in net.listen if a not in listen))
    if not listen:
        raise NodeError(f"the libp2p transport listens on TCP, and none of {', '.join(net.listen)} is a TCP address")
    listen = listen_addresses(cfg.state_dir, net, listen)
    seen = ports.seen_peers(cfg.state_dir)
    if not net.peers and not seen and net.dht_client:
        raise NodeError(LP2P_NEEDS_PEERS)

    def attempts() -> list[str]:
        # The given peers first; from the second attempt on, also the peers seen last time.
        peers = list(dict.fromkeys(list(net.peers) + (seen if dialling.attempts or not net.peers else [])))
        if peers:
            dialling.since = dialling.since or time.time()
            dialling.attempts += 1
        return peers

    with open(os.path.join(cfg.state_dir, IDENTITY_FILE), "rb") as fh:
        identity = fh.read()
    network = await Lp2pNetwork.create(identity, listen, net.announce, run_id=spec.run_id, spec_hash=spec_hash,
                                       ttl_s=cfg.record_ttl_s, refuse=refuse, dht_server=not net.dht_client)
    try:
        delay = 1.0
        while True:
            try:
                joined, _ = await unless_stopped(network.join(attempts()), should_stop)
            except DHTUnreachable as e:
                if not net.peers and not net.dht_client:
                    # The peer that started the swarm, restarted: nobody it saw last answers.
                    log.warning("none of the %d peers seen last time answers: starting alone", len(seen))
                    await network.join([])
                    break
                log.warning("%s; trying again in %.0f s", e, delay)
                slept, _ = await unless_stopped(asyncio.sleep(delay), should_stop)
                delay = min(2 * delay, net.retry_max_s)
                joined = None if slept else False
            if joined is False:  # stopped (Ctrl-C, SIGTERM) before the DHT was reached
                await network.close()
                return None
            if joined:
                break
    except BaseException:
        await network.close()
        raise
    dialling.since = None
    if net.keep_ports and not net.announce:
        ports.remember(cfg.state_dir, ports.listened(await network.p2p.get_visible_maddrs()))
    return network
