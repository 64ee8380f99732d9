"""What a daemon owns on the network before it trains: its p2pd with the listen addresses
and relay policy (its state directory and identity: node/statedir.py).

Relay policy (on purpose): a peer may *dial through* relays (`use_relay`), so it can reach
volunteers behind NAT that found a relay, but it never *acts* as a relay for others
(`relay_hop_limit` 0) and does not look for one itself unless asked (`auto_relay`):
relaying strangers' traffic would spend the volunteer's upload on bytes that train nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from locoswarm.node.checks import bind_problem
from locoswarm.node.statedir import IDENTITY_FILE, NodeError
from locoswarm.node.lifecycle import unless_stopped

# hivemind (which imports torch) is imported where p2pd starts, not here: what only reads
# settings through this module (`node status`, the Docker healthcheck that runs it, `config
# show`) then starts in 0.3 s instead of 2.3 s on 2 CPU cores.
if TYPE_CHECKING:
    from hivemind.p2p import P2P

log = logging.getLogger(__name__)
DEFAULT_LISTEN = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]


@dataclass(kw_only=True, slots=True)
class NetworkConfig:
    listen: list[str] = field(default_factory=lambda: list(DEFAULT_LISTEN))
    """Multiaddrs p2pd listens on (TCP and QUIC on all interfaces by default)."""
    announce: list[str] = field(default_factory=list)
    """Multiaddrs to announce instead of the listen addresses (a public address behind port forwarding)."""
    peers: list[str] = field(default_factory=list)
    """Initial peers to join through; empty: start a new swarm."""
    auto_relay: bool = False
    """Look for a relay to become reachable from behind NAT."""
    keep_ports: bool = True
    """Listen again on the ports of the last run where the listen port is 0 (node/ports.py)."""
    dht_client: bool = False
    """Take part in the DHT as a client: store and read, answer no one's DHT requests (a
    peer behind NAT that others cannot dial would only make their requests time out)."""
    retry_max_s: float = 30.0
    """Longest wait between two attempts to reach the initial peers."""
    transport: str = "auto"
    """auto, p2pd or libp2p (node/portable.py TRANSPORTS, node/network.py): hivemind's p2pd, or
    py-libp2p in the daemon's process (Windows; a DHT client that joins a swarm, never starts one)."""
    state_upload_mbit: float = 100.0
    """At most this many Mbit/s for serving the swarm's state to joiners, all of them
    together (0: no limit): joiners, or identities pretending to be, cannot take the
    volunteer's uplink or the training's share of the machine."""

STOP_STEP_S = 3.0
"""The longest p2pd may take to exit after SIGTERM before it is killed (it takes ~0.1 s;
the whole stop must fit in lifecycle.STOP_GRACE_S)."""


@dataclass(slots=True)
class Dialling:
    """How the start's attempts to reach the initial peers go, for `node status`: a start
    behind a dead bootstrap peer retries for minutes, and must not look like no daemon."""

    since: float | None = None
    """Unix time of the first attempt (None: no initial peers to reach, or reached)."""
    attempts: int = 0
    """p2pd starts tried so far, each dialling every initial peer."""


BOOTSTRAP_FAILED = ("failed to connect to bootstrap peers", "failed to find any peer in table")
"""What p2pd's last line says when none of the initial peers could be reached: hivemind's
error carries p2pd's last line, which is the bootstrap error itself, or on a fast machine
the routing table's refresh, which found no peer, logged as p2pd went down (16 cores,
2026-12-06: a restarted peer exited "p2pd did not start" instead of dialing the peers it saw last)."""


def _host_port(maddr: str) -> str:
    """host:port of an /ip4 or /ip6 multiaddr, as p2pd's errors show them."""
    parts = maddr.split("/")
    return f"{parts[2]}:{parts[4]}" if len(parts) > 4 else maddr


def _bootstrap_failed(text: str) -> bool:
    return any(sign in text for sign in BOOTSTRAP_FAILED)


def listen_addresses(state_dir: str, net: NetworkConfig, wanted: list[str]) -> list[str]:
    """The addresses to listen on of `wanted` (the listen setting, or the part of it a
    transport takes): on the ports kept from the last run (node/ports.py) where their port is
    0 and `net.keep_ports`, unless one of those is in use now (then all anew, with a warning);
    NodeError naming an address that cannot be bound. Tried before the host binds: a port held
    by another go-libp2p program (another locoswarm daemon among them) would be shared with it,
    SO_REUSEPORT letting p2pd bind it too."""
    from locoswarm.node import ports

    listen = ports.pinned(wanted, ports.remembered(state_dir)) if net.keep_ports else wanted
    taken = next((a for a in listen if a not in wanted and bind_problem(a)), None)
    if taken is not None:
        log.warning("the port kept from the last run, %s, is in use: listening on a new one", _host_port(taken))
        listen = wanted
    for maddr in listen:
        problem = bind_problem(maddr)
        if problem:
            raise NodeError(f"cannot listen on {maddr}: {problem}; choose another with --listen")
    return list(listen)


async def start_p2p(state_dir: str, net: NetworkConfig, should_stop: asyncio.Event,
                    dialling: Dialling | None = None) -> tuple[P2P, list[str]] | None:
    """Start p2pd, retrying with backoff while the initial peers cannot be reached; after a
    first failure the peers seen in the last run (ports.seen_peers) are dialed too. Returns
    p2pd and the peers it bootstrapped from; None when `should_stop` is set before it could,
    also in the middle of an attempt. `dialling`: where the attempts are counted."""
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

    from locoswarm.node import ports

    listen = listen_addresses(state_dir, net, net.listen)
    delay = 1.0
    initial = list(net.peers)
    # A peer that started the swarm (no initial peers) and restarts on its state directory
    # rejoins the peers it saw last rather than starting a second swarm beside theirs.
    alone_first = not initial
    if alone_first:
        initial = ports.seen_peers(state_dir)
        alone_first = bool(initial)
    dialling = dialling or Dialling()
    while True:
        if initial:
            dialling.since = dialling.since or time.time()
            dialling.attempts += 1
        try:
            p2p = await _create_unless_stopped(should_stop, initial_peers=initial or None, host_maddrs=listen,
                                               announce_maddrs=net.announce or None,
                                               identity_path=os.path.join(state_dir, IDENTITY_FILE),
                                               use_relay=True, relay_hop_limit=0, use_auto_relay=net.auto_relay)
            if p2p is None:
                log.info("stopped while starting p2pd")
                return None
            if net.keep_ports and not net.announce:  # with --announce, p2pd shows the announced ports, not ours
                ports.remember(state_dir, ports.listened([str(a) for a in await p2p.get_visible_maddrs()]))
            return p2p, initial
        except P2PDaemonError as e:
            text = str(e)
            port = re.search(r"listen \w+ ([\d.:\[\]a-f]+): bind: address already in use", text)
            if port and listen != net.listen:
                # Taken since our last run (by another program): a new port beats not starting.
                log.warning("the port kept from the last run, %s, is in use: listening on a new one", port.group(1))
                listen = net.listen
                continue
            if port:
                raise NodeError(f"cannot listen on {port.group(1)}: the port is in use; "
                                "choose another with --listen") from None
            if "already taken" in text:
                raise NodeError(f"identity {os.path.join(state_dir, IDENTITY_FILE)} is already used by a "
                                "running peer; each node needs its own state directory") from None
            if not _bootstrap_failed(text):
                raise NodeError(f"p2pd did not start: {text.strip()}") from None
            if alone_first:
                log.warning("none of the %d peers seen last time answers: starting alone", len(initial))
                initial, alone_first = [], False
                continue
        seen = [a for a in ports.seen_peers(state_dir) if a not in initial]
        if seen:
            # The swarm may live on without the peers we were given: try those we saw last.
            log.warning("cannot reach the initial peers: dialing also the %d peers seen last time", len(seen))
            initial += seen
            continue
        log.warning("cannot reach any of the initial peers %s; retrying in %.0f s", ", ".join(initial), delay)
        try:
            await asyncio.wait_for(should_stop.wait(), delay)
            log.info("stopped before reaching the initial peers")
            return None
        except asyncio.TimeoutError:
            pass
        delay = min(2 * delay, net.retry_max_s)


async def _create_unless_stopped(should_stop: asyncio.Event, **options) -> P2P | None:
    """hivemind's P2P.create, given up when `should_stop` is set first. A start whose
    bootstrap peer does not answer waits out p2pd's startup timeout (15 s), longer than a
    stop may take; cancelled, P2P.create leaves the p2pd it spawned (and the one that checks
    whether our identity is taken) running, so the p2pd children it started are killed here."""
    import psutil
    from hivemind.p2p import P2P

    before = {c.pid for c in psutil.Process().children()}
    started, p2p = await unless_stopped(P2P.create(**options), should_stop)
    if started:
        return p2p
    if p2p is not None:
        await stop_p2p(p2p)
    left = []
    for child in psutil.Process().children():
        try:
            if child.pid not in before and child.name().startswith("p2pd"):
                child.kill()
                left.append(child)
        except psutil.NoSuchProcess:
            pass
    await asyncio.to_thread(psutil.wait_procs, left, timeout=STOP_STEP_S)
    return None


async def stop_p2p(p2p: P2P, timeout_s: float = STOP_STEP_S) -> None:
    """Stop p2pd: SIGTERM and wait (hivemind's P2P.shutdown, which waits as long as p2pd
    takes), SIGKILL after `timeout_s`. A daemon of the fault suite once sat out its whole
    stop limit after its last round with nothing but the stop left to do (2026-12-05, on a
    loaded 2-core machine): waiting on p2pd without a bound is one way that happens."""
    try:
        await asyncio.wait_for(p2p.shutdown(), timeout_s)
        return
    except asyncio.TimeoutError:
        pass
    child = getattr(p2p, "_child", None)
    if child is not None and child.returncode is None:
        log.warning("p2pd did not stop within %.1f s of SIGTERM: killing it", timeout_s)
        child.kill()
        await asyncio.wait_for(child.wait(), STOP_STEP_S)


async def dial(p2p: P2P, maddr: str, timeout_s: float):
    """Connect p2pd to the peer at `maddr` (ending in /p2p/<peer id>) and return its PeerID;
    ValueError when the multiaddr names no peer."""
    from hivemind.p2p import PeerID

    addr, sep, peer_id = maddr.rpartition("/p2p/")
    if not sep:
        raise ValueError("the multiaddr has no /p2p/<peer id>")
    peer = PeerID.from_base58(peer_id)
    await dial_addrs(p2p, peer, [addr], timeout_s)
    return peer


async def dial_addrs(p2p: P2P, peer, addrs, timeout_s: float) -> None:
    """Connect p2pd to `peer` (a PeerID) at any of `addrs` (multiaddrs, with or without their
    /p2p/<peer id> tail). hivemind exposes no public connect: this is its daemon client's,
    the one P2P.create uses for initial peers."""
    from hivemind.utils.multiaddr import Multiaddr

    bare = [Multiaddr(a.rpartition("/p2p/")[0] if "/p2p/" in a else a) for a in addrs]
    await asyncio.wait_for(p2p._client.connect(peer, bare), timeout_s)


def address_class(maddr: str) -> str:
    """loopback, private (RFC 1918, carrier-grade NAT, link-local, IPv6 ULA) or public, from
    a multiaddr's IP; "other" for a multiaddr without one (a relay circuit, DNS)."""
    import ipaddress

    m = re.match(r"^/ip[46]/([^/]+)/", maddr)
    if not m:
        return "other"
    ip = ipaddress.ip_address(m[1])
    if ip.is_loopback:
        return "loopback"
    if ip.is_private or ip.is_link_local or ip in ipaddress.ip_network("100.64.0.0/10"):
        return "private"
    return "public"


async def probe_network(net: NetworkConfig, timeout_s: float = 10.0) -> dict:
    """Start a throwaway p2pd (a fresh identity: the daemon may be running with ours) on the
    configured listen addresses and report what peers would see: the visible addresses and
    their class, a verdict, and, for each initial peer, whether it could be reached and how
    fast. p2pd runs AutoNAT, but hivemind 1.1.12 gives no way to read its verdict, so the
    verdict comes from the addresses."""
    from hivemind.p2p import P2P
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

    try:
        p2p = await asyncio.wait_for(P2P.create(host_maddrs=net.listen, announce_maddrs=net.announce or None,
                                                use_relay=True, relay_hop_limit=0, auto_nat=True), timeout_s)
    except P2PDaemonError as e:
        return {"addresses": [], "verdict": f"p2pd did not start on {', '.join(net.listen)}: {str(e).strip()}",
                "peers": []}
    try:
        visible = [str(a) for a in await p2p.get_visible_maddrs()]
        classes = {a: address_class(a) for a in visible}
        if "public" in classes.values():
            verdict = ("public address: peers can dial you directly where your firewall lets the listen port in")
        elif "private" in classes.values():
            verdict = ("private addresses only (behind NAT): you can take part, since you dial out to peers, but "
                       "peers cannot dial you first; forward a port and --announce your public address, or use "
                       "--auto-relay")
        else:
            verdict = "loopback only: reachable from this machine alone (listen on 0.0.0.0 to join others)"
        peers = []
        for maddr in net.peers:
            started = time.perf_counter()
            try:
                await dial(p2p, maddr, timeout_s)
                peers.append({"peer": maddr, "reached": True, "ms": round(1000 * (time.perf_counter() - started))})
            except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the probe
                peers.append({"peer": maddr, "reached": False, "error": str(e).strip() or type(e).__name__})
        return {"addresses": [{"maddr": a, "class": c} for a, c in classes.items()], "verdict": verdict,
                "peers": peers}
    finally:
        await p2p.shutdown()


DHT_OPTIONS = dict(cache_nearest=0, cache_on_store=False, cache_refresh_before_expiry=0)
"""hivemind DHTNode behaviours that only cost here, turned off. Our keys hold dictionaries
that many peers write (one subkey each) and every owner rewrites its entry on a schedule:
- cache_nearest: after a get, push the whole dictionary found to the nearest node that lacks
  it, which re-validates every entry; the owners' own stores already reach the replicas.
- cache_on_store: after a store into a dictionary held in the local cache, fetch the whole
  key again in the background: one more full read for every write.
- cache_refresh_before_expiry: re-read cached keys before they expire, whether anyone still
  needs them or not; we read what we need when we need it."""

