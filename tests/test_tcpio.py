"""bench/tcpio.py: the kernel's per-socket TCP counters, read over sock_diag, on real
loopback sockets."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from locoswarm.bench import tcpio


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's TCP counters are read on Linux")
def test_tcp_io_counts_the_bytes_a_process_moves_over_its_open_loopback_sockets():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            before = tcpio.tcp_io({os.getpid()})
            payload = os.urandom(300_000)
            client.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(peer.recv(1 << 16))
            peer.sendall(b"x" * 1000)
            assert client.recv(1000)
            after = tcpio.tcp_io({os.getpid()})
    # Both ends are this process: what one end sent, the other received.
    for moved in (after[0] - before[0], after[1] - before[1]):
        assert 301_000 <= moved < 301_000 + 4096, (before, after)


def test_a_process_that_does_not_exist_counts_nothing():
    assert tcpio.tcp_io({2**22 + 7}) == (0, 0)


def test_tcp_io_says_why_it_cannot_count_off_linux(monkeypatch):
    monkeypatch.setattr(tcpio.sys, "platform", "win32")
    with pytest.raises(tcpio.Unavailable, match="win32"):
        tcpio.tcp_io({os.getpid()})
