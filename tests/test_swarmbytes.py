"""bench/swarmbytes.py and the byte sampling of bench/swarm.py: the daemons' own counts are
reported whether or not the machine's TCP counters can be read, and a transport figure that
cannot be had is null with the reason beside it, in the JSON and in the printed summary."""

from __future__ import annotations

import os

from locoswarm.bench import swarm as swarm_mod
from locoswarm.bench.swarm import LocalSwarm, Peer, RoundLine
from locoswarm.bench.swarmbytes import BYTE_KEYS, byte_figures, format_bytes
from locoswarm.bench.tcpio import Unavailable


def fake_peer(num_rounds: int, *, sent_per_round: int, io: tuple[int, int] | None = None) -> Peer:
    """A peer whose round events grow its counters by fixed amounts a round; `io`: its p2pd's
    bytes sent at its first and last round (None: not sampled)."""
    rounds = [RoundLine(r, 2, 2, 100, 1.0, 1.0, 1.0, 1.0, sent=sent_per_round * r, received=700 * r,
                        progress_sent=50 * r, registry_sent=10 * r, progress_messages=3 * r, progress_writes=2 * r,
                        delta_requests=r, delta_streams=0) for r in range(num_rounds)]
    peer = Peer(0, None, "", None, [], rounds=rounds)  # type: ignore[arg-type]
    if io is not None:
        peer.io_start, peer.io_end = (io[0], 0), (io[1], 0)
    return peer


def test_both_levels_are_reported_per_peer_per_round_where_the_transport_is_counted():
    peers = [fake_peer(5, sent_per_round=1000, io=(10_000, 18_000)), fake_peer(5, sent_per_round=3000, io=(0, 16_000))]
    r = byte_figures(peers, None)
    assert set(r) == set(BYTE_KEYS)
    assert r["delta_bytes_per_peer_per_round"] == 2000
    assert r["delta_bytes_received_per_peer_per_round"] == 700
    assert (r["progress_bytes_per_peer_per_round"], r["registry_bytes_per_peer_per_round"]) == (50, 10)
    assert r["app_bytes_per_peer_per_round"] == 2000 + 50 + 10
    assert r["progress_writes_per_peer_per_round"] == 2 and r["delta_requests_per_peer_per_round"] == 1
    # (8000 + 16000) / 2 peers / 4 rounds; the control plane is what the payload leaves of it.
    assert r["bytes_per_peer_per_round"] == 3000 and r["control_bytes_per_peer_per_round"] == 1000
    assert r["transport_peers_counted"] == 2 and r["transport_bytes_unavailable"] is None
    assert r["app_bytes_unavailable"] is None
    text = "\n".join(format_bytes(r))
    assert "2,060 sent by the daemons' code" in text and "3,000 sent over p2pd's TCP sockets" in text


def test_without_the_kernels_counters_the_daemons_counts_stay_and_the_transport_is_null_with_the_reason():
    peers = [fake_peer(3, sent_per_round=1000), fake_peer(3, sent_per_round=1000)]
    r = byte_figures(peers, "per-socket TCP counters are read from Linux's sock_diag; this is darwin")
    assert r["app_bytes_per_peer_per_round"] == 1060 and r["delta_bytes_per_peer_per_round"] == 1000
    assert r["bytes_per_peer_per_round"] is None and r["control_bytes_per_peer_per_round"] is None
    assert r["transport_peers_counted"] == 0
    assert "darwin" in r["transport_bytes_unavailable"]
    lines = format_bytes(r)
    assert any("1,060 sent by the daemons' code" in line for line in lines)
    assert any("not counted: per-socket TCP counters" in line for line in lines)


def test_a_p2pd_never_found_leaves_the_transport_null_and_says_so():
    r = byte_figures([fake_peer(3, sent_per_round=500)], None)
    assert r["bytes_per_peer_per_round"] is None
    assert r["transport_bytes_unavailable"] == "no peer's p2pd was found at both its first and its last round"
    assert r["app_bytes_per_peer_per_round"] == 560


def test_peers_with_fewer_than_two_rounds_give_no_rate_and_say_why():
    r = byte_figures([fake_peer(1, sent_per_round=500, io=(0, 100))], None)
    assert r["app_bytes_per_peer_per_round"] is None and r["bytes_per_peer_per_round"] is None
    assert r["app_bytes_unavailable"] == r["transport_bytes_unavailable"] == "no peer reported two rounds"
    assert format_bytes(r) == ["  bytes/peer/round       not counted by the daemons: no peer reported two rounds",
                               "  at the transport       not counted: no peer reported two rounds"]


def test_the_swarm_keeps_the_first_reason_the_counters_cannot_be_read_and_stops_asking(monkeypatch, tmp_path):
    asked = []

    def refuse(pid: int) -> tuple[int, int]:
        asked.append(pid)
        raise Unavailable("sock_diag refused the dump: Operation not permitted")

    monkeypatch.setattr(swarm_mod, "_io", refuse)
    swarm = LocalSwarm(2, spec_path=None, max_rounds=3, threads=1, eval_every=0, keep_dir=str(tmp_path))
    peer = fake_peer(0, sent_per_round=0)
    peer.proc = type("Proc", (), {"pid": 4242})()  # type: ignore[assignment]
    assert swarm._io(peer) is None and swarm._io(peer) is None
    assert asked == [4242]
    assert swarm.io_unavailable == "sock_diag refused the dump: Operation not permitted"


def test_a_daemon_that_is_gone_or_has_no_p2pd_is_not_sampled():
    assert swarm_mod._io(2**22 + 7) is None
    assert swarm_mod._io(os.getpid()) is None  # this process has no p2pd child
