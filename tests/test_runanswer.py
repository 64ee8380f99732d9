"""The "which run?" answer (protocol/runanswer.py), as both transports encode and read it: a
run's id and spec prefix, or only that a run is private; anything else is refused by name."""

import msgpack
import pytest

from locoswarm.protocol.errors import MalformedMessage
from locoswarm.protocol.runanswer import RunAnswer, decode_run_answer, encode_run_answer, not_ours


def test_an_open_and_a_private_run_answer_as_they_were_encoded():
    spec = bytes(range(32))
    assert decode_run_answer("p", encode_run_answer("my-run", spec, private=False)) == \
        RunAnswer(peer="p", run_id="my-run", spec_hash=spec.hex()[:16])
    private = decode_run_answer("p", encode_run_answer("secret-run", spec, private=True))
    assert private == RunAnswer(peer="p", run_id=None, spec_hash="") and private.describe() == "p: a private run"


@pytest.mark.parametrize("body", [None, b"", b"\xc1", msgpack.packb([1, 2]),
                                  msgpack.packb({"run_id": 5, "spec_hash": ""}),
                                  msgpack.packb({"run_id": "x" * 129, "spec_hash": ""}),
                                  msgpack.packb({"run_id": "a\nb", "spec_hash": ""}),
                                  msgpack.packb({"run_id": "r", "spec_hash": "XYZ"}),
                                  msgpack.packb({"run_id": "r", "spec_hash": "a" * 65})])
def test_anything_else_is_refused_naming_the_peer(body):
    with pytest.raises(MalformedMessage, match="run answer of peer-7"):
        decode_run_answer("peer-7", body)


def test_peers_of_other_runs_are_named_and_one_of_ours_or_none_says_nothing():
    spec = bytes(32)
    theirs = RunAnswer("q", "other-run", "ab" * 8)
    assert not_ours([theirs], "my-run", spec, private=False) == "q: run 'other-run' (spec abababababababab)"
    assert not_ours([theirs, RunAnswer("r", "my-run", spec.hex()[:16])], "my-run", spec, private=False) is None
    assert not_ours([], "my-run", spec, private=False) is None
    assert not_ours([RunAnswer("s", None, "")], "my-run", spec, private=True) is None
