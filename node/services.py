"""The streams one peer serves and pulls on its p2pd, built, started and closed together: the
deltas it serves (node/exchange.py), the outer state it serves to joiners (node/statesync.py),
the progress bus (node/progress.py), the kept streams it pulls deltas on, the rows' aggregates
when the run has tree rounds (node/tree.py), and the answer to the run question
(node/runinfo.py). The daemon (node/daemon.py) starts them once its trainer exists and closes
them when it stops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from locoswarm.node.exchange import DeltaServer, delta_streams
from locoswarm.node.membership import Membership
from locoswarm.node.ownrecord import OwnRecord
from locoswarm.node.progress import ProgressBus
from locoswarm.node.runinfo import RunInfoServer
from locoswarm.node.spec import RunSpec
from locoswarm.node.statesync import StateServer
from locoswarm.node.streams import KeptStreams
from locoswarm.node.tree import RowExchange

if TYPE_CHECKING:  # the streams run on p2pd's P2P or on py-libp2p's TrioP2P (node/network.py)
    from hivemind.p2p import P2P


@dataclass(slots=True)
class PeerStreams:
    deltas: DeltaServer
    states: StateServer
    progress: ProgressBus
    pulls: KeptStreams
    """The kept streams this peer pulls the round's deltas on."""
    rows: RowExchange | None
    """Tree rounds' row aggregates, with rounds.exchange "tree"; None otherwise."""

    @classmethod
    async def start(cls, p2p: P2P, spec: RunSpec, spec_hash: bytes, *, peer_id: str, incarnation: int,
                    membership: Membership, record: OwnRecord, trainer, upload_bytes_per_s: float,
                    on_state_encoded: Callable[[int, str], None]) -> PeerStreams:
        """Every stream served on `p2p`, each admitting the peers `membership` admits; the
        state server bounded to `upload_bytes_per_s`, telling `on_state_encoded(round, digest)`
        each state it encodes."""
        states = StateServer(p2p, trainer.state_spec, admit=membership.admit, upload_bytes_per_s=upload_bytes_per_s,
                             residual_spec=trainer.residual_spec)
        states.on_encoded = on_state_encoded
        out = cls(deltas=DeltaServer(p2p, incarnation=incarnation, admit=membership.admit), states=states,
                  progress=ProgressBus(p2p, peer_id, admit=membership.admit, spec_hash=spec_hash, record=record,
                                       on_record=membership.heard, on_gone=membership.gone),
                  pulls=delta_streams(p2p),
                  rows=(RowExchange(p2p, incarnation=incarnation, admit=membership.admit)
                        if spec.rounds.exchange == "tree" else None))
        try:
            if out.rows is not None:
                await out.rows.start()
            await out.deltas.start()
            await out.states.start()
            await out.progress.start()
            await RunInfoServer(p2p, spec.run_id, spec_hash, private=spec.access.restricted).start()
        except BaseException:
            out.close()
            raise
        return out

    @property
    def bytes_sent(self) -> int:
        """Bytes of deltas, row aggregates and state written to streams."""
        return sum(s.bytes_sent for s in (self.deltas, self.rows and self.rows.server, self.states) if s is not None)

    @property
    def requests_refused(self) -> int:
        return self.deltas.limits.refused + self.states.limits.refused

    def close(self) -> None:
        self.deltas.stop()
        if self.rows is not None:
            self.rows.close()
        self.progress.close()
        self.pulls.close()
