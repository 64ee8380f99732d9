"""What the round loop (node/roundloop.py) works with, as the Daemon wires it: the context of
its collaborators, the node's own figures it reports (status, metrics, the dashboard), and
where a test injects faults into a real daemon."""

from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from locoswarm.node.dashboard import Contributions
from locoswarm.node.events import EventSink

if TYPE_CHECKING:
    from locoswarm.node.checkpoint import Checkpointer
    from locoswarm.node.config import NodeConfig
    from locoswarm.node.console import RoundBar
    from locoswarm.node.exchange import DeltaServer
    from locoswarm.node.governor import IdleWatch
    from locoswarm.node.lineage import Lineage
    from locoswarm.node.membership import Membership
    from locoswarm.node.progress import ProgressBus
    from locoswarm.node.spec import RunSpec
    from locoswarm.node.statesync import StateServer
    from locoswarm.node.streams import KeptStreams
    from locoswarm.node.threads import Pools
    from locoswarm.node.trainer import RoundWork, Trainer
    from locoswarm.protocol import DecodedDelta
    from locoswarm.node.tree import RowExchange


class RoundFaults:
    """Where a test injects faults into a real daemon (as torchft's EventInjector does):
    tests pass a subclass to the Daemon (tests/peers/faulty_node.py). This base is the
    production one: it changes nothing."""

    def trained(self, round_: int, work: RoundWork, outer: list) -> None:
        """At the round boundary, before the delta is encoded (may alter `work`; `outer`: the
        outer state's parameters the round started from, read only)."""

    def reporting(self, round_: int) -> None:
        """Before this peer reports its round progress as done (may raise)."""

    def keep_delta(self, round_: int, sender: str, others: list[str]) -> bool:
        """Whether a received delta is kept: False drops it as if its request had timed
        out. `others`: the peers this one expects in the round, by peer id."""
        return True


@dataclass(slots=True)
class OuterStep:
    """What a round's outer step takes and what it leaves on record: of a full round, the
    screened deltas; of a tree round (node/tree.py), the rows' aggregates."""

    deltas: list[DecodedDelta]
    earned: dict[str, int]
    """Credits for the ledger (Screened.earned)."""
    banned: tuple[str, ...]
    shares: int
    """Peers' worth of planned work the step stands for (RoundStep.carry)."""
    accepted: dict[str, int]
    """sender → tokens its delta was weighted by: the dashboard's contributions."""
    chain: list[tuple]
    """The entries of the round chain (node/chains.py round_chain)."""
    wires: list[bytes]
    """The messages kept for peers catching up (node/replay.py): the deltas a full round
    screened, the rows' aggregates a tree round held to each other."""
    sampled: bool
    """Deltas left out on purpose (a fanout below the participants)."""


@dataclass(slots=True)
class NodeStats:
    """What the node reports of itself (status, metrics, the dashboard); written on the loop."""

    state: str = "starting"
    rounds_completed: int = 0
    rounds_discarded: int = 0
    last_round_at: float | None = None
    """Unix time this peer last ended a round (aggregated it)."""
    loss: float | None = None
    eval_loss: float | None = None
    bytes_received: int = 0
    delta_requests: int = 0
    deltas_rejected: int = 0
    checks: int = 0
    """Other peers' deltas this peer checked against its own work (optim/check.py)."""
    checks_failed: int = 0
    least_agreement: float | None = None
    """The lowest agreement of the last round's checks (honest deltas measured 0.3 and up)."""
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))
    """The last rounds, for the dashboard's chart."""
    tokens_trained: int = 0
    """Tokens this process trained in the rounds it aggregated (the dashboard's x axis)."""
    contributions: Contributions = field(default_factory=Contributions)
    """Per peer, the deltas this peer took from it, refused or missed (the dashboard)."""
    started_unix_s: float = field(default_factory=time.time)
    """When this node was listening, its first event (the dashboard's time axis starts there, as a
    baseline's starts at the first event of its file)."""


@dataclass(kw_only=True, slots=True)
class RoundContext:
    """What the round loop works with, wired by the Daemon."""

    spec: RunSpec
    spec_hash: bytes
    cfg: NodeConfig
    peer_id: str
    incarnation: int
    """This process's life (PeerRecord.incarnation)."""
    p2p: object
    registry: object
    """The transport's peer registry (node/registry.py PeerRegistry on p2pd, net/noderegistry.py
    on py-libp2p); the round loop asks it for the anchors' roll (`read_roll`)."""
    trainer: Trainer
    pools: Pools
    membership: Membership
    progress: ProgressBus
    lineage: Lineage
    deltas: DeltaServer
    states: StateServer
    checkpoints: Checkpointer
    idle: IdleWatch
    events: EventSink
    stats: NodeStats
    bar: RoundBar
    should_exit: asyncio.Event
    faults: RoundFaults
    bytes_sent: Callable[[], int]
    delta_streams: KeptStreams
    """The streams this peer asks for deltas on (node/exchange.py delta_streams)."""
    rows: RowExchange | None = None
    """Where tree rounds' row aggregates are served and pulled (node/tree.py); None unless
    the spec's rounds.exchange is "tree"."""
    registry_sent: Callable[[], int] = lambda: 0
    """Signed registry entry bytes stored at other replicas so far (node/replicas.py)."""
    bootstrap: frozenset[str] = frozenset()
    """Peer ids of the peers this node was told to join through (--peer, the spec's
    initial_peers): they vouch for the state it takes while it knows no earned weight."""
    rng: random.Random = field(default_factory=random.Random)
