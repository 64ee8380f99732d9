"""The iterative Kademlia lookup of a key's nearest DHT nodes, as hivemind's dht/traverse.py
does it (a beam search by XOR distance): keep the `beam_size` nearest nodes heard of, ask the
nearest not yet asked (`num_workers` at a time) for their own nearest, stop when the whole
beam has been asked or after `max_rounds` rounds. A node that fails to answer leaves the beam,
its error kept with its peer; the lookup carries on with the others.

Transport-free: the caller passes `ask(node_id, peer, named_by) -> (answer, neighbours)`, so a test can
fake the network.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

Peer = TypeVar("Peer")
Ask = Callable[[bytes, Peer, Peer | None], Awaitable[tuple[Any, Mapping[bytes, Peer]]]]
"""(node id, peer, the peer that named it or None for a starting node) -> (what the node
answered, {node id: peer} of the nodes it names). The namer is whom to ask for an address."""


def distance(a: bytes, b: bytes) -> int:
    """XOR distance of two 20-byte ids (hivemind's DHTID.xor_distance)."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


@dataclass(slots=True)
class Lookup(Generic[Peer]):
    """What a lookup learned: the nodes that answered, nearest first, with their answers,
    every node heard of, and the failures by peer."""

    key_id: bytes
    answered: list[tuple[bytes, Peer, Any]] = field(default_factory=list)
    heard: dict[bytes, Peer] = field(default_factory=dict)
    referrer: dict[bytes, Peer] = field(default_factory=dict)
    """Who named each node (none for the starting ones): the peer to ask for its address."""
    failures: list[tuple[Peer, str]] = field(default_factory=list)

    def nearest(self, k: int) -> list[tuple[bytes, Peer]]:
        ranked = sorted(self.answered, key=lambda a: distance(a[0], self.key_id))
        return [(node_id, peer) for node_id, peer, _ in ranked[:k]]


async def traverse(key_id: bytes, start: Mapping[bytes, Peer], ask: Ask, *, beam_size: int = 20,
                   num_workers: int = 4, max_rounds: int = 8) -> Lookup[Peer]:
    """Runs the lookup of `key_id` from the `start` nodes (see the module docstring). `ask`
    raising an Exception counts as that node failing, with the exception's text."""
    found: Lookup[Peer] = Lookup(key_id=key_id, heard=dict(start))
    asked: set[bytes] = set()
    failed: set[bytes] = set()

    async def visit(node_id: bytes) -> None:
        peer = found.heard[node_id]
        try:
            answer, neighbours = await ask(node_id, peer, found.referrer.get(node_id))
        except Exception as e:  # one node's failure is recorded, never the lookup's
            failed.add(node_id)
            found.failures.append((peer, f"{type(e).__name__}: {e}"))
            return
        found.answered.append((node_id, peer, answer))
        for other, other_peer in neighbours.items():
            if len(other) == len(key_id) and other not in found.heard:
                found.heard[other] = other_peer
                found.referrer[other] = peer

    for _ in range(max_rounds):
        beam = sorted((n for n in found.heard if n not in failed), key=lambda n: distance(n, key_id))[:beam_size]
        todo = [n for n in beam if n not in asked][:num_workers]
        if not todo:
            break
        asked.update(todo)
        async with trio.open_nursery() as nursery:
            for node_id in todo:
                nursery.start_soon(visit, node_id)
    return found
