"""The swarm's peer registry over py-libp2p (issue 22): every live peer record of a run,
found as docs/protocol.md ("Reading a swarm", "Finding every peer") says, on `DHTClient.get`;
and this peer's own record, written where the daemons read (`store_own`). The daemon's registry
on py-libp2p (net/noderegistry.py) is made of these.

The keys are `locoswarm:<run id>:peers:<L>:<b>`, b the first L bits of sha256(base58 peer id)
(`bucket_key`, `bucket_of` in protocol/records.py, which the daemon's registry uses too).

An entry is taken as its peer's only when all of these hold, as node/registry.py checks them:
its subkey is the peer id followed by an owner marker, and the key in the marker is that peer's
identity (`DHTClient.get` already dropped entries whose signature fails against that key, but
hivemind's validator checks nothing about whose key it is); the peer hashes into the bucket it
was read from; it expires at most TTL + CLOCK_SLACK_S from now; its value decodes as a peer
record of the run's spec (protocol/records.py) naming the same peer. Anything else is dropped and
named in `rejected`; a tombstone (b"": the peer left) is no record and no fault.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import trio

from locoswarm.net.dht import DHTClient, ValueWithExpiration
from locoswarm.protocol.dhtrecords import subkey_author
from locoswarm.protocol.errors import ProtocolError
from locoswarm.protocol.records import BUCKET_ENTRIES, PeerRecord, bucket_key, bucket_of, decode_record

log = logging.getLogger(__name__)
CLOCK_SLACK_S = 30.0
"""An entry may expire at most this long after now + TTL (node/registry.py): one expiring later
would outlive its writer's refreshes."""
MAX_ENTRIES_READ = 8 * BUCKET_ENTRIES
"""At most this many entries of one bucket are decoded (the freshest), as node/registry.py."""


def check_bucket(found: ValueWithExpiration | None, level: int, bucket: int, spec_hash: bytes, *, ttl_s: float,
                 rejected: list[tuple[str, str]], now: float | None = None,
                 withdrawn: set[str] | None = None) -> dict[str, PeerRecord]:
    """The records of one bucket as `DHTClient.get` returned it that pass every check (module
    docstring), by peer id; each refused entry goes to `rejected` as (who, why), the peers
    whose entry is a tombstone to `withdrawn`."""
    where = f"bucket {level}:{bucket}"
    if found is None:
        return {}
    if not isinstance(found.value, dict):
        rejected.append((where, f"holds a {type(found.value).__name__}, not a dictionary"))
        return {}
    deadline = (time.time() if now is None else now) + ttl_s + CLOCK_SLACK_S
    entries: list[tuple[float, str, Any]] = []
    for subkey, item in found.value.items():
        owner, marked, signer = subkey_author(subkey)
        if not marked:
            rejected.append((repr(subkey)[:80], f"{where}: the subkey names no owner key (an unsigned entry)"))
        elif signer != owner:
            rejected.append((owner, f"{where}: signed by a key that is not its identity (that key's peer id: "
                                    f"{signer or 'unreadable'})"))
        elif bucket_of(owner, level) != bucket:
            rejected.append((owner, f"{where}: the peer does not hash into it"))
        elif not isinstance(item.expiration, (int, float)) or item.expiration > deadline:
            rejected.append((owner, f"{where}: expires too far ahead ({item.expiration!r})"))
        else:
            entries.append((item.expiration, owner, item.value))
    if len(entries) > MAX_ENTRIES_READ:  # a stuffed bucket: only the freshest are looked at
        entries.sort(key=lambda e: e[0], reverse=True)
        rejected.append((where, f"holds {len(entries)} entries: only the {MAX_ENTRIES_READ} freshest read"))
        del entries[MAX_ENTRIES_READ:]
    out: dict[str, PeerRecord] = {}
    for _, owner, value in entries:
        if value == b"":  # a tombstone: the peer left
            if withdrawn is not None:
                withdrawn.add(owner)
            continue
        if not isinstance(value, bytes):
            rejected.append((owner, f"{where}: the entry is a {type(value).__name__}, not bytes"))
            continue
        try:
            record = decode_record(value, spec_hash)
        except ProtocolError as e:
            rejected.append((owner, f"{where}: {type(e).__name__}: {e}"))
            continue
        if record.peer_id != owner:
            rejected.append((owner, f"{where}: the record names peer {record.peer_id}"))
        elif owner not in out or record.round > out[owner].round:
            out[owner] = record
    return out


async def _get_all(client: DHTClient, keys: list[str], num_workers: int) -> dict[str, ValueWithExpiration | None]:
    """`client.get` of each key, at most `num_workers` at a time."""
    found: dict[str, ValueWithExpiration | None] = {}
    limiter = trio.CapacityLimiter(num_workers)

    async def one(key: str) -> None:
        async with limiter:
            found[key] = await client.get(key)

    async with trio.open_nursery() as nursery:
        for key in keys:
            nursery.start_soon(one, key)
    return found


async def read_registry(client: DHTClient, run_id: str, spec_hash: bytes, *, ttl_s: float = 60.0,
                        max_level: int = 10, num_workers: int = 4,
                        rejected: list[tuple[str, str]] | None = None,
                        withdrawn: set[str] | None = None) -> dict[str, PeerRecord]:
    """Every live peer record of run `run_id` (spec hash `spec_hash`), by peer id: level 0's
    bucket when it holds between 1 and BUCKET_ENTRIES · √2 records (everyone, in such a swarm);
    otherwise bucket 0 of levels 1 … `max_level` is probed, the highest level whose count c
    fits (⌊log2(c · 2^L / 32)⌋ is L − 1 or L) is where the swarm writes, and all its 2^L
    buckets are read. `max_level` bounds the reads (2^10 buckets: swarms up to ≈45,000 peers).
    `ttl_s` is the run's record TTL (`record_ttl_s`). Refused entries are appended to
    `rejected` as (who, why), the peers whose entry is a tombstone to `withdrawn`; a node's
    failure stays in `client.failures`."""
    if not 0 <= max_level <= 24:
        raise ValueError(f"max_level must be in [0, 24], got {max_level}")
    refused: list[tuple[str, str]] = [] if rejected is None else rejected

    def records(found: ValueWithExpiration | None, level: int, bucket: int) -> dict[str, PeerRecord]:
        return check_bucket(found, level, bucket, spec_hash, ttl_s=ttl_s, rejected=refused, withdrawn=withdrawn)

    everyone = records(await client.get(bucket_key(run_id, 0, 0)), 0, 0)
    if 0 < len(everyone) < BUCKET_ENTRIES * math.sqrt(2) or max_level == 0:
        return everyone
    probes = await _get_all(client, [bucket_key(run_id, level, 0) for level in range(1, max_level + 1)], num_workers)
    level = 0
    for candidate in range(1, max_level + 1):
        count = len(records(probes[bucket_key(run_id, candidate, 0)], candidate, 0))
        if count and math.floor(math.log2(max(1.0, count * 2 ** candidate / BUCKET_ENTRIES))) in (candidate - 1,
                                                                                                  candidate):
            level = candidate
    if level == 0:
        return everyone
    keys = [bucket_key(run_id, level, b) for b in range(2 ** level)]
    found = await _get_all(client, keys, num_workers)
    out: dict[str, PeerRecord] = {}
    for b, key in enumerate(keys):
        out.update(records(found[key], level, b))
    return out


# ---------------------------------------------------------------------------- our own record


async def store_own(client: DHTClient, run_id: str, peer_id: str, value: bytes, *, ttl_s: float,
                    levels: tuple[int, ...]) -> bool:
    """Store `value` (an encoded record, or b"": a tombstone) as `peer_id`'s entry of its bucket at
    each of `levels`, signed with the client's identity (which must be that peer's) and valid for
    `ttl_s` from now; True when a node took it at every level."""
    if peer_id != client.identity.peer_id:
        raise ValueError(f"a record of {peer_id} cannot be signed by {client.identity.peer_id}")
    subkey = peer_id.encode() + client.identity.owner_marker
    expiration = time.time() + ttl_s
    taken = []
    for level in levels:
        verdicts = await client.store(bucket_key(run_id, level, bucket_of(peer_id, level)), value, expiration,
                                      subkey=subkey)
        taken.append(any(verdicts.values()))
    return all(taken)
