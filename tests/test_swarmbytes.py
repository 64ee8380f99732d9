"""bench/swarmbytes.py and the byte sampling of bench/swarm.py: the daemons' own counts are
reported whether or not the machine's TCP counters can be read, and a transport figure that
cannot be had is null with the reason beside it, in the JSON and in the printed summary."""

from __future__ import annotations

import os

from locoswarm.bench import swarm as swarm_mod
from locoswarm.bench import tcpio
from locoswarm.bench.swarm import LocalSwarm
from locoswarm.bench.swarmpeer import Peer, RoundLine
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
        peer.io = (io[1] - io[0], 0, io[1] // 100)
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
    assert r["transport_closed_bytes_per_peer_per_round"] == (180 + 160) / 2 / 4
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
    assert r["transport_bytes_unavailable"] == "no peer's p2pd was found at each of its rounds"
    assert r["app_bytes_per_peer_per_round"] == 560


def test_peers_with_fewer_than_two_rounds_give_no_rate_and_say_why():
    r = byte_figures([fake_peer(1, sent_per_round=500, io=(0, 100))], None)
    assert r["app_bytes_per_peer_per_round"] is None and r["bytes_per_peer_per_round"] is None
    assert r["app_bytes_unavailable"] == r["transport_bytes_unavailable"] == "no peer reported two rounds"
    assert format_bytes(r) == ["  bytes/peer/round       not counted by the daemons: no peer reported two rounds",
                               "  at the transport       not counted: no peer reported two rounds"]


def test_the_swarm_keeps_the_first_reason_the_counters_cannot_be_read_and_stops_asking(monkeypatch, tmp_path):
    asked = []

    def refuse() -> dict:
        asked.append(1)
        raise Unavailable("sock_diag refused the dump: Operation not permitted")

    monkeypatch.setattr(swarm_mod, "_p2pds", lambda pid: {pid + 1})
    monkeypatch.setattr(tcpio, "socket_bytes", refuse)
    monkeypatch.setattr(swarm_mod, "socket_bytes", refuse)
    swarm = LocalSwarm(2, spec_path=None, max_rounds=3, threads=1, eval_every=0, keep_dir=str(tmp_path))
    peer = fake_peer(0, sent_per_round=0)
    peer.proc = type("Proc", (), {"pid": 4242})()  # type: ignore[assignment]
    swarm.peers.append(peer)
    swarm._read_io(peer, {"event": "listening"})
    swarm._read_io_between_rounds()
    swarm._read_io(peer, {"event": "round", "round": 2, "time": 10.0})
    assert asked == [1] and peer.io is None
    assert swarm.io_unavailable == "sock_diag refused the dump: Operation not permitted"


def test_a_daemon_that_is_gone_or_has_no_p2pd_has_none_to_read():
    assert swarm_mod._p2pds(2**22 + 7) == set()
    assert swarm_mod._p2pds(os.getpid()) == set()  # this process has no p2pd child


class FakeMeter(tcpio.TcpMeter):
    """Reads the sockets of no process: each reading logs the next of `readings` (time, sent,
    received) instead, and what it was asked is remembered."""

    def __init__(self, readings: list[tuple[float, int, int, int]]) -> None:
        super().__init__()
        self.readings, self.asked = iter(readings), []

    def read(self, pids: set[int], counters: dict | None = None, at: float | None = None) -> tuple[int, int]:
        self.asked.append((pids, counters, at))
        self.log.append(next(self.readings))
        return self.log[-1][1:3]


def test_a_peer_is_read_from_its_start_and_counted_over_a_window_holding_its_rounds(monkeypatch, tmp_path):
    found_at = {4242: [{7}], 5353: [set()]}
    monkeypatch.setattr(swarm_mod, "_p2pds", lambda pid: found_at[pid].pop(0))
    monkeypatch.setattr(swarm_mod, "socket_bytes", lambda: {"dump": 1})
    monkeypatch.setattr(swarm_mod.time, "time", lambda: 99.0)
    swarm = LocalSwarm(2, spec_path=None, max_rounds=3, threads=1, eval_every=0, keep_dir=str(tmp_path))
    found, lost = fake_peer(0, sent_per_round=0), fake_peer(0, sent_per_round=0)
    # Readings at its start (t=1), between rounds, at its first round's event (read after the
    # round ended at t=5), and at its last round's (ended at t=20).
    readings = [(1.0, 0, 0, 0), (4.0, 100, 10, 0), (5.5, 300, 20, 0), (9.0, 400, 30, 50), (21.0, 900, 70, 50)]
    for peer, pid, meter in ((found, 4242, FakeMeter(readings)), (lost, 5353, FakeMeter([]))):
        peer.proc = type("Proc", (), {"pid": pid})()  # type: ignore[assignment]
        peer.io_meter = meter
        swarm.peers.append(peer)
    swarm._read_io_between_rounds()  # before their p2pd is found: nobody is read
    assert found.io_meter.asked == []
    swarm._read_io(found, {"event": "listening"})
    swarm._read_io(lost, {"event": "listening"})  # no p2pd: the transport does not count it
    assert lost.io_lost and lost.io_meter.asked == []
    swarm._io_next = 0.0
    swarm._read_io_between_rounds()  # one dump, shared, for the peers being counted
    assert found.io_meter.asked[-1] == ({7}, {"dump": 1}, 99.0)
    swarm._read_io(found, {"event": "round", "round": 0, "time": 5.0})
    found.rounds.append(RoundLine(0, 2, 2, 100, 1.0, 1.0, 1.0, 1.0, ended_unix_s=5.0))
    swarm._io_next = 0.0
    swarm._read_io_between_rounds()
    swarm._read_io(found, {"event": "round", "round": 2, "time": 20.0})
    # From the last reading before its first round ended (t=4) to the one after its last.
    assert found.io == (800, 60, 50) and lost.io is None
    swarm._io_next = 0.0
    swarm._read_io_between_rounds()
    swarm._read_io(found, {"event": "round", "round": 2, "time": 30.0})  # reported again: the figure stands
    assert len(found.io_meter.asked) == 5 and found.io == (800, 60, 50)
