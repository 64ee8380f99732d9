"""A py-libp2p host that p2pd (hivemind's daemon) accepts as a peer: the RSA identity of a
locoswarm/hivemind identity file, TCP, Noise and yamux (p2pd offers no other muxer), as
seen working in the interop spike (docs/protocol.md, "Speaking the swarm without hivemind").
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import multiaddr
import trio
from libp2p import NOISE_PROTOCOL_ID, create_yamux_muxer_option, new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import Transport as NoiseTransport

from locoswarm.protocol.dhtrecords import Identity, load_identity

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


class DialError(Exception):
    """A peer could not be reached at the address given; names the address."""


def key_pair_of(identity_file: bytes) -> tuple[KeyPair, Identity]:
    """The libp2p key pair and locoswarm's Identity (its `cryptography` key, to sign DHT
    records with RSA-PSS) of identity file contents. Both derive one peer id; a file that is
    not an RSA identity is MalformedMessage (load_identity names why)."""
    identity = load_identity(identity_file)
    private = deserialize_private_key(identity_file)
    key_pair = KeyPair(private, private.get_public_key())
    libp2p_id = ID.from_pubkey(key_pair.public_key).to_base58()
    assert libp2p_id == identity.peer_id, f"py-libp2p derives {libp2p_id}, locoswarm {identity.peer_id}"
    return key_pair, identity


def make_host(key_pair: KeyPair) -> IHost:
    """A host that secures connections with Noise (p2pd's first choice) and muxes with yamux."""
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise}, muxer_opt=create_yamux_muxer_option())


@contextlib.asynccontextmanager
async def run_host(key_pair: KeyPair, listen: Sequence[str] = LOOPBACK) -> AsyncIterator[IHost]:
    """The host of `key_pair`, listening on the `listen` multiaddrs while the block runs."""
    host = make_host(key_pair)
    async with host.run(listen_addrs=[multiaddr.Multiaddr(m) for m in listen]):
        yield host


def peer_info(maddr: str) -> PeerInfo:
    """The peer id and address of a multiaddr that ends in /p2p/<id>; ValueError otherwise."""
    if "/p2p/" not in maddr:
        raise ValueError(f"{maddr}: a peer's address must end in /p2p/<peer id>")
    return info_from_p2p_addr(multiaddr.Multiaddr(maddr))


async def dial(host: IHost, maddr: str, *, timeout_s: float = 10.0) -> ID:
    """Connects to the peer at `maddr` (ending in /p2p/<id>) and returns its id; DialError
    naming the address and the last failure when it cannot be reached in `timeout_s`. A
    failed attempt is tried again after 0.2 s, doubling: on a loaded machine a dial to a
    live p2pd failed once (its handshake cut), where the next one would have gone through."""
    info = peer_info(maddr)
    last = "no attempt finished"
    pause = 0.2
    with trio.move_on_after(timeout_s):
        while True:
            try:
                await host.connect(info)
                return info.peer_id
            except Exception as e:  # py-libp2p raises many types (SwarmException, OSError, handshake errors)
                last = f"{type(e).__name__}: {e}"
            await trio.sleep(pause)
            pause = min(2 * pause, 2.0)
    raise DialError(f"{maddr}: no connection within {timeout_s} s (last: {last})")
