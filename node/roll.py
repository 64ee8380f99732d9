"""The anchors' rolls (protocol/roll.py): whose word a joiner takes while none of a run's
trust anchors is live.

A joiner whose ledger knows nobody took only a state one of the run's anchors vouched for,
and exited while none was live: a rule that waits for listed peers, which left every
newcomer out whenever the organiser's machines were down. Now each anchor, while it trains,
signs the established peers of the newest state it serves (`keep_roll`: when they change,
else every ROLL_EVERY_S while its round moves) into the DHT, for ROLL_TTL_S; a joiner that
finds no anchor live reads the newest roll an anchor signed (`read_roll`) and takes the state
that the live peers named there attest by a majority, as a peer with a ledger does with its own (node/lineage.py
`attested_state`; node/catchup.py). Identities minted after the roll are not on it; peers
on it that have turned since can lead a joiner only where they are most of the roll's live
peers, the limit earned weight has everywhere (docs/trust.md).

The roll lives at the key's replicas (the ~5 DHT nodes nearest the key) for ROLL_TTL_S, and
about RELAY_PEERS peers of the swarm every ROLL_RELAY_S store it again, signed as the anchor
signed it, at the nodes nearest the key then (`relay_rolls`): it outlives the nodes it was
first stored at while one node holding it is there when a relay comes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from typing import TYPE_CHECKING, Callable

from locoswarm.protocol.roll import Roll, encode_roll, newest_roll, roll_key, roll_peers, take_roll
from locoswarm.protocol.state import Ledger

if TYPE_CHECKING:
    from hivemind.dht.node import DHTNode

    from locoswarm.node.replicas import ReplicaStore

log = logging.getLogger(__name__)
ROLL_EVERY_S = 30.0
"""Least time between two rolls an anchor signs for a newer round alone (its peers the same):
one DHT store of about 3 kB."""
ROLL_RELAY_S = 300.0
"""How often, on average, a relaying peer stores the rolls again (`relay_rolls`)."""
RELAY_PEERS = 4.0
"""Relays a period in the whole swarm, whatever its size."""
ROLL_TTL_S = 24 * 3600.0
"""How long a roll stays in the DHT after the anchor signed it: a night and a day without
any anchor live."""


async def keep_roll(dht: DHTNode, subkey: bytes, run_id: str, spec_hash: bytes,
                    newest: Callable[[], tuple[int, str, Ledger] | None], threshold: int, *,
                    every_s: float = ROLL_EVERY_S, poll_s: float = 1.0) -> None:
    """An anchor's loop: store the roll of the newest state it serves (`newest()`: round,
    chain, ledger; its peers of credit >= `threshold`) under the run's roll key and our
    `subkey` (peer id and owner key: the DHT signs it) whenever the peers it names changed,
    else every `every_s` while the round moves on; looked at every `poll_s`. Runs until
    cancelled; a failed store is logged and tried again at the next look."""
    from hivemind.utils import get_dht_time  # here: the round modules import without hivemind (docs/windows.md)

    signed: tuple[int, list[str] | None, float] = (-1, None, -math.inf)
    while True:
        state = newest()
        if state is not None and state[1]:
            round_, chain, ledger = state
            peers = roll_peers(ledger, threshold)
            last_round, last_peers, at = signed
            if peers != last_peers or (round_ > last_round and time.monotonic() >= at + every_s):
                try:
                    if await dht.store(roll_key(run_id), encode_roll(spec_hash, round_, chain, peers),
                                       get_dht_time() + ROLL_TTL_S, subkey=subkey):
                        signed = (round_, peers, time.monotonic())
                        log.info("signed the roll of round %d: %d established peers", round_, len(peers))
                    else:
                        log.warning("the roll of round %d was not stored: no DHT node took it; trying again", round_)
                except Exception as e:  # the DHT is unreachable for now: the next look tries again
                    log.warning("storing the roll of round %d failed: %s: %s", round_, type(e).__name__, e)
        await asyncio.sleep(poll_s)


async def relay_rolls(store: ReplicaStore, run_id: str, spec_hash: bytes, anchors: list[str],
                      swarm_size: Callable[[], float], rng: random.Random, *, every_s: float = ROLL_RELAY_S) -> None:
    """Any peer's loop, in a run with anchors: every `every_s`, with a chance of
    RELAY_PEERS / `swarm_size()` (about RELAY_PEERS relays a period in the whole swarm, not
    one a peer), store the anchors' rolls again at the roll key's replicas now
    (ReplicaStore.relay: signed as the anchors signed them), so that they outlive the nodes
    they were first stored at while an anchor is away. Runs until cancelled."""
    def keep(subkey: object, value: object) -> bool:
        return isinstance(take_roll(subkey, value, anchors, spec_hash), Roll)

    while True:
        await asyncio.sleep(rng.uniform(0.5, 1.5) * every_s)
        if rng.random() * max(1.0, swarm_size()) >= RELAY_PEERS:
            continue
        try:
            sent = await store.relay(roll_key(run_id), keep)
            if sent:
                log.info("relayed %d roll entries to the roll key's replicas", sent)
        except Exception as e:  # the DHT is unreachable for now: the next period tries again
            log.warning("relaying the anchors' rolls failed: %s: %s", type(e).__name__, e)


async def read_roll(dht: DHTNode, run_id: str, spec_hash: bytes, anchors: list[str]) -> Roll | None:
    """The newest roll (by round) that one of `anchors` signed, None when none is found.
    Entries not signed by the peer their subkey names, signed by a peer that is no anchor,
    or malformed are logged and skipped."""
    found = await dht.get(roll_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return None
    roll, skipped = newest_roll({k: item.value for k, item in found.value.items()}, anchors, spec_hash)
    for why in skipped:
        log.warning("%s: skipped", why)
    return roll
