"""protocol/statepull.py's download rules without I/O, which node/statedownload.py drives on either
transport: which manifest a download takes (`pick_manifest`) and
which chunk each donor asks for next (`ChunkPull`, `Donor`)."""

from __future__ import annotations

import pytest
import torch

from locoswarm.protocol.state import Manifest, StateAssembler, StateSpec, decode_manifest, encode_state
from locoswarm.protocol.statepull import (DONOR_CUTS, DONOR_FAILURES, ChunkPull, Donor, StateUnavailable,
                                          pick_manifest)

SPEC = StateSpec("run", bytes(32), (("w", (3, 1000)),))
CHUNK = 4096


def _state(round_: int = 5, chain: str = "a" * 32):
    """A manifest of 3 × 1,000 float32 values (12,000 bytes: 3 chunks) and its body."""
    manifest, body = encode_state(SPEC, {"w": torch.arange(3000, dtype=torch.float32).view(3, 1000)}, round_,
                                  chunk_bytes=CHUNK, chain=chain)
    return decode_manifest(manifest, SPEC), body


def _chunk(body: bytes, i: int) -> bytes:
    return body[i * CHUNK:(i + 1) * CHUNK]


def _m(round_: int, digest: bytes, chain: str = "c" * 32) -> Manifest:
    return Manifest(round=round_, chunk_bytes=CHUNK, chunks=(), digest=digest, chain=chain)


def test_pick_takes_the_newest_state_two_donors_agree_on_over_a_newer_single_one():
    old, new = _m(5, b"x"), _m(9, b"y")
    assert pick_manifest({"a": old, "b": old, "c": new}, asked=3) is old
    assert pick_manifest({"a": old, "c": new}, asked=2) is new  # no two agree: the newest
    with pytest.raises(StateUnavailable, match="none of the 3 donors asked"):
        pick_manifest({}, asked=3)


def test_pick_with_a_target_takes_only_that_round_and_chain_and_with_attesters_only_theirs():
    attested, other_chain, newer = _m(7, b"x", "d" * 32), _m(7, b"z", "e" * 32), _m(9, b"y", "d" * 32)
    found = {"a": attested, "b": other_chain, "c": other_chain, "d": newer, "e": newer}
    assert pick_manifest(found, asked=5, target=(7, "d" * 32)) is attested
    with pytest.raises(StateUnavailable, match="attested state of round 8"):
        pick_manifest(found, asked=5, target=(8, "d" * 32))
    assert pick_manifest(found, asked=5, trusted=["a"]) is attested  # whatever the others agree on
    with pytest.raises(StateUnavailable, match="none of the 0 trusted donors"):
        pick_manifest(found, asked=5, trusted=[])


def test_a_pull_hands_each_chunk_out_once_resumes_a_cut_one_first_and_requeues_a_bad_one_last():
    manifest, body = _state()
    asm = StateAssembler(SPEC, manifest)
    pull = ChunkPull(asm)
    assert [pull.take() for _ in range(2)] == [(0, 0), (1, 0)]
    pull.cut(0, _chunk(body, 0)[:100])  # cut after 100 bytes: asked again first, from there
    assert pull.take() == (0, 100)
    pull.delivered(0, _chunk(body, 0)[100:])
    with pytest.raises(Exception, match="does not match its hash"):
        pull.delivered(1, b"\0" * CHUNK)  # a bad chunk: back to the queue's end
    assert list(pull.queue) == [2, 1]
    index, offset = pull.take()
    pull.failed(index)  # a failed request: to the end as well, nothing of it kept
    assert list(pull.queue) == [1, 2] and not pull.idle()
    while (job := pull.take()) is not None:
        pull.delivered(job[0], _chunk(body, job[0])[job[1]:])
    assert pull.idle() and not asm.missing()
    assert torch.equal(asm.finish()["w"], torch.arange(3000, dtype=torch.float32).view(3, 1000))


def test_a_pull_is_not_idle_while_a_chunk_is_in_flight():
    manifest, _ = _state()
    pull = ChunkPull(StateAssembler(SPEC, manifest))
    jobs = [pull.take() for _ in range(3)]
    assert pull.take() is None and not pull.idle()  # another donor's chunk may come back
    pull.failed(jobs[-1][0])
    assert pull.take() == jobs[-1]


def test_a_donor_is_dropped_after_its_failures_or_cuts_in_a_row():
    donor = Donor()
    for _ in range(DONOR_FAILURES):
        assert donor.alive
        donor.failed()
    assert not donor.alive
    donor = Donor()
    for _ in range(DONOR_CUTS - 1):
        donor.cut()
    donor.delivered()  # a delivered chunk starts the count of cuts again
    for _ in range(DONOR_CUTS - 1):
        donor.cut()
    assert donor.alive
    donor.cut()
    assert not donor.alive
