"""What this peer shows of itself: its PeerRecord, built afresh whenever the registry, the
progress streams or the join ask for it (node/upkeep.py, node/progress.py, node/joining.py),
with a sequence number that grows with each change of anything but the throughput.

While the peer joins (its state download included) the record says paused, so that the
peers it reaches before it trains neither count it toward --min-peers nor tell it rounds it
cannot take part in.
"""

from __future__ import annotations

import dataclasses

from locoswarm.node.governor import IdleWatch
from locoswarm.node.lineage import Lineage
from locoswarm.node.spec import RunSpec
from locoswarm.protocol.records import PeerRecord


class OwnRecord:
    def __init__(self, spec: RunSpec, spec_hash: bytes, incarnation: int, lineage: Lineage, idle: IdleWatch) -> None:
        self.spec, self.spec_hash, self.incarnation = spec, spec_hash, incarnation
        self.lineage, self.idle = lineage, idle
        self.peer_id = ""
        self.addrs: list[str] = []
        self.trainer = None
        """The replica whose round and device the record shows; set before the first call."""
        self.work = 0
        """The nonce proving this identity's work for the run (node/work.py; 0: none asked)."""
        self.joining = True
        """Until the join is over: the record says paused."""
        self._last: PeerRecord | None = None
        self._seq = 0

    def __call__(self) -> PeerRecord:
        """Our record now; its sequence number grows with each change of anything but the
        throughput (which moves every step, and is news to nobody)."""
        steps = self.trainer.outer_steps
        record = PeerRecord(peer_id=self.peer_id, addrs=tuple(self.addrs[:16]), device=self.trainer.device.type,
                            tokens_per_s=0.0, round=steps, spec_hash=self.spec_hash,
                            paused=self.idle.paused is not None or self.joining,
                            proof=self.spec.access.proof(self.spec_hash, self.peer_id), work=self.work,
                            incarnation=self.incarnation, **self.lineage.shown(steps))
        if record != self._last:
            self._last, self._seq = record, self._seq + 1
        return dataclasses.replace(record, seq=self._seq, tokens_per_s=float(self.trainer.tokens_per_s))
