"""Peer discovery through the DHT, in bounded buckets (docs/scale.md, "The bounded design";
the arithmetic is node/buckets.py). Each peer keeps its signed record (protocol/records)
under its bucket key `locoswarm:<run>:peers:<L>:<b>` at its write levels L (two, one in a
small swarm), one subkey per peer, with an expiry it refreshes; a peer that vanishes
(SIGKILL, cut network) is forgotten when its record expires, and one that leaves cleanly
withdraws it with an empty tombstone at every level it wrote. Runs on the caller's event
loop through hivemind's DHTNode (no forked DHT process).

What a peer pays no longer grows with the swarm: it writes its own entry into one or two buckets
(`call_store` at the replicas that a value-less traversal found, node/replicas.py, not
DHTNode.store, whose traversal carries the whole bucket back from every node it asks), and
reads its own bucket every refresh (one replica's copy a read, the replicas in turn, merged
by entry expiration; the first read every replica's) and a random sample of the others every
VIEW_READ_S (each stopping at the first copy fresh enough). A bucket holds 23–45 records on
average whatever N is, so the bytes and signature checks of a read are bounded by that, and the
view kept is at most VIEW_MAX records. Below ≈45 peers everything is in level 0's one
bucket, read every refresh: every peer sees every other, as before buckets.

Records are signed: with an RSASignatureValidator (hivemind's; the DHT node must be created
with it) the subkey is the peer id followed by the owner's public key, and every DHT node
refuses a write to it that the owner did not sign, so no peer can overwrite or withdraw
another's record. A record whose subkey does not start with the peer id it names is
refused, as is an unsigned one when this registry signs its own. And the signing key must
be the peer's libp2p identity (its peer id is the hash of that public key, which the DHT
node checks when it authenticates a connection): a record signed by any other key — a
stranger's advertising another peer's id under a subkey of its own — is refused, so a
record names the peer that signed it. Every bucket read is untrusted: an entry whose peer id
does not hash into the bucket is refused (no one fills a bucket with arbitrary ids; ids
mined to land in one still can, a cost of about 2^L key generations per entry), as is one
expiring further ahead than any honest clock, and at most MAX_ENTRIES_READ entries of a
bucket are decoded per read (the freshest: a stuffing attacker can crowd honest entries
out of one bucket's read, not make the read unbounded).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import Callable

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.utils import get_dht_time

from locoswarm.node.buckets import MAX_LEVEL, PartialView, SizeEstimate, buckets_to_sample, read_level, write_levels
from locoswarm.node.replicas import ReplicaStore
from locoswarm.node.roll import read_roll
from locoswarm.node.upkeep import redial, rediscover
from locoswarm.protocol import ProtocolError
from locoswarm.protocol.dhtrecords import subkey_author
from locoswarm.protocol.roll import Roll
from locoswarm.protocol.records import BUCKET_ENTRIES, PeerRecord, bucket_key, bucket_of, decode_record, encode_record

log = logging.getLogger(__name__)


VIEW_READ_S = 20.0
"""At level ≥ 1, the other sampled buckets are read this often (the own bucket every refresh)."""
PROBE_S = 30.0
"""Least time between two bootstrap probes (reads of the own bucket at every level)."""
MAX_ENTRIES_READ = 8 * BUCKET_ENTRIES
"""At most this many entries of one bucket are decoded per read (the freshest): bounds the
work a stuffed bucket can cause. Honest buckets hold ≈45 at most."""
READ_WORKERS = 1
"""Requests a read of sampled buckets keeps in flight (hivemind's default is 4): each answer
carries the whole bucket, and those still in flight when the first fresh copy arrives are
paid for nothing (docs/scale.md: 4 workers cost ≈60 % more than 2; the model puts one at
half of two). These reads run in the background every VIEW_READ_S, where the round trips
one at a time cost nothing; the own bucket is read one replica's copy at a time already."""
CLOCK_SLACK_S = 30.0
"""An entry may expire at most this long after now + TTL (clocks differ); one expiring later
is refused, and a cached copy of a bucket that expires later is dropped before a read (it
would pass for fresh and hide newcomers)."""


@dataclasses.dataclass(slots=True)
class BucketRead:
    """One bucket as one read found it, after the checks."""
    key: str
    live: list[PeerRecord]
    withdrawn: set[str]
    expires: dict[str, float] | None = None
    """Peer id → its entry's expiration time, for a copy read from one replica (else None)."""


class PeerRegistry:
    """One peer's side of the registry: `announce` writes its record into its buckets at
    its write levels, `withdraw` tombstones them, `peers()` reads and returns the partial
    view; `peers_estimate` is the swarm size the reads suggest."""

    def __init__(self, dht: DHTNode, run_id: str, spec_hash: bytes, *, ttl_s: float = 30.0,
                 validator: RSASignatureValidator | None = None,
                 refuse: Callable[[PeerRecord], str | None] | None = None,
                 read_period_s: float = 1.0, peer_id: str | None = None, signs: bool = False) -> None:
        """`refuse(record)`: why a valid record's peer is not admitted (a private run's
        access policy), None to take it. `read_period_s`: how often the caller calls
        `peers()` (the own bucket's freshness test). `peer_id`: whose buckets are the own
        ones (default: the DHT node's peer id). `signs`: `validator` signs what is stored, not
        the DHT node's (an identity without a host of its own: bench/fake_peer.py)."""
        self.dht = dht
        self.refuse = refuse
        self.validator = validator
        self.run_id = run_id
        self.spec_hash = spec_hash
        self.ttl_s = ttl_s
        self.read_period_s = read_period_s
        self.peer_id = peer_id or dht.peer_id.to_base58()
        self.store = ReplicaStore(dht, signer=validator if signs else None)
        self.estimate = SizeEstimate()
        self.view = PartialView(keep_s=2 * VIEW_READ_S + ttl_s, dht_clock=get_dht_time)
        self.rejected: list[tuple[str, str]] = []
        """(subkey, reason) of the records refused by the last `peers()` call."""
        self.withdrawn: set[str] = set()
        """Peer ids whose record the last `peers()` call found withdrawn (left on purpose)."""
        self._written: dict[int, float] = {}
        """level → when (monotonic) our record was last written there: tombstones go to each."""
        self._next_sample = 0.0
        self._sampled_level = -1
        self._next_probe = 0.0

    @property
    def peers_estimate(self) -> float:
        """N_est: how many peers this registry estimates the swarm has."""
        return self.estimate.value

    def _own_key(self, level: int, peer_id: str | None = None) -> str:
        return bucket_key(self.run_id, level, bucket_of(peer_id or self.peer_id, level))

    async def announce(self, record: PeerRecord) -> bool:
        """Store or refresh this peer's record, valid for `ttl_s` from now, in its buckets at
        its write levels; True when every store was taken."""
        levels = write_levels(self.estimate.value)
        now = time.monotonic()
        for level in levels:
            self._written[level] = now
        return await self._store_own(record.peer_id, encode_record(record), levels)

    async def withdraw(self, peer_id: str) -> bool:
        """Replace this peer's record by a tombstone in every bucket it was written to within
        a TTL. The tombstone lives one TTL from now: it outlives every copy of the record it
        replaces, and a longer life would make a bucket's copies look fresh (`_read`)."""
        now = time.monotonic()
        levels = [level for level, at in self._written.items() if now - at <= self.ttl_s] or list(
            write_levels(self.estimate.value))
        return await self._store_own(peer_id, b"", levels)

    async def _store_own(self, peer_id: str, value: bytes, levels) -> bool:
        """Store `value` as `peer_id`'s entry in its bucket at each of `levels`, for `ttl_s`
        from now; True when every store was taken."""
        expiration = get_dht_time() + self.ttl_s
        done = await asyncio.gather(*(self.store.store(self._own_key(level, peer_id), self._subkey(peer_id), value,
                                                       expiration) for level in levels))
        return all(done)

    def _subkey(self, peer_id: str) -> str | bytes:
        if self.validator is None:
            return peer_id
        return peer_id.encode() + self.validator.local_public_key

    async def peers(self) -> list[PeerRecord]:
        """Read the own bucket (and, when due, the sampled others) and return the partial
        view: the valid, live records this peer knows of, by peer id, at most VIEW_MAX;
        refused entries go to `rejected`, tombstones found to `withdrawn`. With everyone in
        one bucket (level 0) the view is every live peer."""
        self.rejected, self.withdrawn = [], set()
        level = read_level(self.estimate.value)
        now = time.monotonic()
        own = self._own_key(level)
        others: list[str] = []
        sampling = level == 0 or now >= self._next_sample or level != self._sampled_level
        if sampling and level > 0:
            wanted = buckets_to_sample(level, self.estimate.value / 2 ** level) - 1
            mine = bucket_of(self.peer_id, level)
            others = [bucket_key(self.run_id, level, b) for b in _sample_buckets(level, mine, wanted)]
        reads = [self._read_own(own, level)]
        if others:
            reads.append(self._read(others, level, VIEW_READ_S))
        found = [bucket for group in await asyncio.gather(*reads) for bucket in group]
        if sampling:
            self._next_sample, self._sampled_level = now + VIEW_READ_S, level
            self.estimate.add(sum(len(b.live) for b in found) / len(found), level)
        if not any(r.peer_id != self.peer_id for b in found for r in b.live) and now >= self._next_probe:
            self._next_probe = now + PROBE_S
            found += await self._probe(level)
        for bucket in found:
            self.view.update(bucket.key, bucket.live, bucket.withdrawn, bucket.expires)
            self.withdrawn |= bucket.withdrawn
        return self.view.records()

    async def redial(self, record: PeerRecord) -> bool:
        """Dial a vanished peer at its record's addresses and ping it back into the DHT's
        routing table (node/upkeep.py redial); True when it answered."""
        return await redial(self.dht.protocol.p2p, self.dht, record)

    async def rediscover(self, initial_peers: list[str]) -> None:
        """Dial the initial peers again and ping them back into the routing table."""
        await rediscover(self.dht, initial_peers)

    async def read_roll(self, anchors: list[str]) -> Roll | None:
        """The newest roll one of `anchors` signed (node/roll.py), None when none is found."""
        return await read_roll(self.dht, self.run_id, self.spec_hash, anchors)

    @property
    def aged_out(self) -> set[str]:
        """Peers the last `peers()` call let go of for age or room (out of sight, not known
        to have vanished: not to be dialed back)."""
        return self.view.aged_out

    async def _probe(self, level: int) -> list[BucketRead]:
        """Nobody else at our read level (a newcomer to a large swarm reads level 0, where
        nobody writes; or the swarm shrank under us): read our own bucket at every other
        level at once and restart the estimate from the highest level whose sample is
        consistent, i.e. whose own estimate would write there (a lone entry at a high level,
        a stale or lying peer, implies a swarm that writes lower and is passed over)."""
        levels = [lv for lv in range(MAX_LEVEL + 1) if lv != level]
        found = await self._read([self._own_key(lv) for lv in levels], None, self.read_period_s)
        best = None
        for lv, bucket in zip(levels, found):
            others = [r for r in bucket.live if r.peer_id != self.peer_id]
            implied = len(bucket.live) * 2 ** lv
            if others and lv in write_levels(implied):
                best = (lv, implied, bucket)
        if best is None:
            return []
        log.info("registry probe: peers write at level %d, about %d peers", best[0], best[1])
        self.estimate.reset(best[1])
        return [best[2]]

    async def _read_own(self, key: str, level: int) -> list[BucketRead]:
        """Read our own bucket, read every refresh: one copy from one of its replicas, the
        replicas in turn, the first read every replica's, merged (node/replicas.py
        ReplicaStore.read; the view merges the copies by entry expiration). A read that
        stops at the first fresh copy would, on a replica, be answered by its own storage
        alone, and hide for good a peer that stored at replicas found before this one joined."""
        read = self._check(key, level, int(key.rsplit(":", 1)[1]), await self.store.read(key, whole_first=True),
                           expires={})
        return [read]

    async def _read(self, keys: list[str], level: int | None, period_s: float) -> list[BucketRead]:
        """Read bucket `keys` in one traversal. The read asks the network for a copy written
        within about half a read period (`sufficient_expiration_time`): hivemind's get
        otherwise returns a cached copy that has not expired without asking anyone, and a
        newcomer would stay unseen until the cached copy expired. A copy suffices once its
        newest entry expires that late: ours, stored just before the read, makes the own
        bucket's replicas' copies sufficient at the first answer, and the local cache's copy
        from the previous read never is. A copy cached with an entry expiring beyond any
        honest clock is dropped first: it would pass for fresh forever."""
        now = get_dht_time()
        cache = self.dht.protocol.cache
        for key in keys:
            key_id = DHTID.generate(source=key)
            cached = cache.get(key_id)
            if cached is not None and cached.expiration_time > now + self.ttl_s + CLOCK_SLACK_S:
                del cache[key_id]
        fresh_after = now + max(0.0, self.ttl_s - period_s / 2)
        found = await self.dht.get_many(keys, sufficient_expiration_time=fresh_after, num_workers=READ_WORKERS)
        out = []
        for key in keys:
            key_level = int(key.rsplit(":", 2)[1]) if level is None else level
            out.append(self._check(key, key_level, int(key.rsplit(":", 1)[1]), found.get(key)))
        return out

    def _check(self, key: str, level: int, bucket: int, found, expires: dict | None = None) -> BucketRead:
        """The entries of one bucket copy that pass every check; the rest to `rejected`.
        `expires`: a dictionary to fill with each taken entry's expiration time (a copy of
        one replica's, merged by the view)."""
        read = BucketRead(key, [], set(), expires)
        if found is None:
            return read
        if not isinstance(found.value, dict):
            self._reject(key, f"bucket {level}:{bucket} holds a {type(found.value).__name__}, not a dictionary")
            return read
        deadline = get_dht_time() + self.ttl_s + CLOCK_SLACK_S
        entries = []
        for subkey, item in found.value.items():
            owner, signed, signer = subkey_author(subkey)
            if bucket_of(owner, level) != bucket:
                self._reject(owner, f"peer {owner} does not hash into bucket {level}:{bucket}")
            elif not isinstance(item.expiration_time, (int, float)) or item.expiration_time > deadline:
                self._reject(owner, f"entry of {owner} expires too far ahead ({item.expiration_time!r})")
            else:
                entries.append((item.expiration_time, owner, signed, signer, subkey, item.value))
        if len(entries) > MAX_ENTRIES_READ:  # a stuffed bucket: only the freshest are looked at
            entries.sort(key=lambda e: e[0], reverse=True)
            self._reject(key, f"bucket {level}:{bucket} holds {len(entries)} entries: only the "
                              f"{MAX_ENTRIES_READ} freshest read")
            del entries[MAX_ENTRIES_READ:]
        latest: dict[str, PeerRecord] = {}
        for expiration_time, owner, signed, signer, subkey, value in sorted(entries, key=lambda e: str(e[4])):
            if value == b"":
                if self.validator is None or signer == owner:
                    read.withdrawn.add(owner)
                    if expires is not None:
                        expires[owner] = max(expires.get(owner, float("-inf")), expiration_time)
                continue
            if not isinstance(value, bytes):
                self._reject(owner, f"entry of {owner} is a {type(value).__name__}, not bytes")
                continue
            try:
                record = decode_record(value, self.spec_hash)
            except ProtocolError as e:
                self._reject(subkey, str(e))
                continue
            if self.validator is not None and not signed:
                self._reject(subkey, f"record of {record.peer_id} is not signed")
                continue
            if record.peer_id != owner:
                self._reject(owner, f"record names peer {record.peer_id}, stored under {owner}")
                continue
            if self.validator is not None and signer != record.peer_id:
                self._reject(owner, f"record of {record.peer_id} is signed by a key that is not its identity "
                                    f"(that key's peer id: {signer or 'unreadable'})")
                continue
            why = self.refuse(record) if self.refuse is not None else None
            if why is not None:
                self._reject(owner, why)
                continue
            best = latest.get(record.peer_id)
            if best is None or record.round > best.round:
                latest[record.peer_id] = record  # after a restart with a new key, two records for a while
                if expires is not None:
                    expires[record.peer_id] = expiration_time
        read.live = [latest[p] for p in sorted(latest) if p not in read.withdrawn]
        return read

    def _reject(self, subkey: object, reason: str) -> None:
        """Log and keep one refusal (once a call: a record is written at up to two levels,
        and a probe may read it at both)."""
        if (str(subkey), reason) in self.rejected:
            return
        log.warning("peer record under %s refused: %s", subkey, reason)
        self.rejected.append((str(subkey), reason))


def _sample_buckets(level: int, own: int, count: int) -> list[int]:
    """`count` distinct random buckets of `level`, the `own` one excluded."""
    num_buckets = 2 ** level
    if num_buckets <= 4096:
        return random.sample([b for b in range(num_buckets) if b != own], min(count, num_buckets - 1))
    picks: set[int] = set()
    while len(picks) < count:
        b = random.randrange(num_buckets)
        if b != own:
            picks.add(b)
    return sorted(picks)
