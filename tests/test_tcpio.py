"""bench/tcpio.py: the kernel's per-socket TCP counters, read over sock_diag, on real
loopback sockets."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from locoswarm.bench import tcpio


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's TCP counters are read on Linux")
def test_a_meter_counts_the_bytes_a_process_moves_over_its_open_loopback_sockets():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            meter = tcpio.TcpMeter()
            meter.read({os.getpid()})
            payload = os.urandom(300_000)
            client.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(peer.recv(1 << 16))
            peer.sendall(b"x" * 1000)
            assert client.recv(1000)
            moved = meter.read({os.getpid()})
    # Both ends are this process: what one end sent, the other received.
    for count in moved:
        assert 301_000 <= count < 301_000 + 4096, moved


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's TCP counters are read on Linux")
def test_a_meter_keeps_what_a_closed_connection_moved_and_counts_a_new_one_whole():
    meter = tcpio.TcpMeter()
    with socket.create_server(("127.0.0.1", 0)) as server:
        old = socket.create_connection(server.getsockname())
        old_peer, _ = server.accept()
        _send(old, old_peer, 200_000)  # before the first reading: not counted
        assert meter.read({os.getpid()}) == (0, 0)
        _send(old, old_peer, 100_000)
        assert 100_000 <= meter.read({os.getpid()})[0] < 100_000 + 4096
        old.close()
        old_peer.close()
        new = socket.create_connection(server.getsockname())
        new_peer, _ = server.accept()
        with new, new_peer:
            _send(new, new_peer, 50_000)
            sent, received = meter.read({os.getpid()})
    # A sum over the open sockets would have fallen by the closed pair's 300 KB; the meter
    # kept what they moved between its readings and added the new pair's bytes whole (both ends
    # are this process: what one sent, the other received).
    assert 150_000 <= sent < 150_000 + 8192 and 150_000 <= received < 150_000 + 8192, (sent, received)
    assert len(meter.log) == 3 and meter.log[-1][1:3] == (sent, received)
    assert 300_000 <= meter.closed_sent < 300_000 + 8192  # what the closed pair had sent, both ends


def test_a_window_is_counted_from_the_reading_before_its_start_to_the_one_after_its_end():
    meter = tcpio.TcpMeter()
    meter.log = [(1.0, 0, 0, 0), (2.0, 50, 5, 0), (3.0, 80, 8, 40), (4.0, 120, 9, 40)]
    assert meter.between(2.5, 3.5) == (70, 4, 40)
    assert meter.between(2.0, 3.0) == (30, 3, 40)  # readings at its ends bracket it
    assert meter.between(0.5, 3.0) is None and meter.between(1.5, 4.5) is None


def _send(client: socket.socket, server_end: socket.socket, count: int) -> None:
    client.sendall(os.urandom(count))
    got = 0
    while got < count:
        got += len(server_end.recv(1 << 16))


def test_a_process_that_does_not_exist_counts_nothing():
    meter = tcpio.TcpMeter()
    assert meter.read({2**22 + 7}) == meter.read({2**22 + 7}) == (0, 0)


def test_a_meter_says_why_it_cannot_count_off_linux(monkeypatch):
    monkeypatch.setattr(tcpio.sys, "platform", "win32")
    with pytest.raises(tcpio.Unavailable, match="win32"):
        tcpio.TcpMeter().read({os.getpid()})
