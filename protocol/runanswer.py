"""The "which run?" question (`locoswarm/run/1`), whatever carries it: node/runinfo.py on
p2pd and on py-libp2p (through net/bridge.py). The question is the one byte REQUEST; the answer a frame
holding a msgpack map `{"run_id": str, or nil for a private run, "spec_hash": the first 16
hex digits of the spec hash, or "" for a private run}`."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from locoswarm.protocol.errors import MalformedMessage

PROTOCOL = "locoswarm/run/1"
REQUEST = b"\x01"
"""The question (one byte: the version of the answer asked for)."""
MAX_ANSWER = 1024


@dataclass(frozen=True, slots=True)
class RunAnswer:
    peer: str
    run_id: str | None
    """None: a private run."""
    spec_hash: str
    """Hex (the first 16 digits); empty for a private run."""

    def describe(self) -> str:
        if self.run_id is None:
            return f"{self.peer}: a private run"
        return f"{self.peer}: run {self.run_id!r} (spec {self.spec_hash})"


def encode_run_answer(run_id: str, spec_hash: bytes, *, private: bool) -> bytes:
    answer = {"run_id": None, "spec_hash": ""} if private else {"run_id": run_id, "spec_hash": spec_hash.hex()[:16]}
    return msgpack.packb(answer, use_bin_type=True)


def decode_run_answer(peer: str, body: bytes | None) -> RunAnswer:
    """`peer`'s answer; MalformedMessage when it is not one."""
    try:
        fields = msgpack.unpackb(body or b"", raw=False, max_str_len=MAX_ANSWER, max_map_len=4)
    except Exception as e:
        raise MalformedMessage(f"run answer of {peer} is not msgpack: {type(e).__name__}") from None
    run_id, spec_hash = (fields.get("run_id"), fields.get("spec_hash")) if isinstance(fields, dict) else (1, 1)
    if not (run_id is None or isinstance(run_id, str) and 0 < len(run_id) <= 128 and run_id.isprintable()) \
            or not isinstance(spec_hash, str) or len(spec_hash) > 64 or not all(c in "0123456789abcdef"
                                                                                for c in spec_hash):
        raise MalformedMessage(f"run answer of {peer} holds something else than a run id and a spec hash")
    return RunAnswer(peer=peer, run_id=run_id, spec_hash=spec_hash)


def not_ours(answers: list[RunAnswer], run_id: str, spec_hash: bytes, *, private: bool) -> str | None:
    """Why the peers that answered are not a swarm of our run (None: one of them may be
    ours, or none answered): every answer names another run or another spec of ours, or,
    where our run is open, a private run."""
    ours = spec_hash.hex()[:16]
    if not answers or any(a.run_id == run_id and a.spec_hash == ours or a.run_id is None and private
                          for a in answers):
        return None
    return "; ".join(a.describe() for a in answers)
