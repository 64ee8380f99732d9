"""Bytes a process sent and received over TCP, from the kernel's own per-socket counters.

Linux keeps, for every TCP socket, the bytes sent and received over its life (`tcp_info`'s
`tcpi_bytes_sent` and `tcpi_bytes_received`, what `ss -ti` prints as bytes_sent and
bytes_received). They are read here over a sock_diag netlink socket (the interface `ss`
itself uses), so counting needs neither iproute2 nor root: every TCP socket of the machine
is listed with its inode, and a process's sockets are the inodes its /proc/PID/fd links
name. Loopback traffic is counted like any other, libp2p's encryption and framing included.

`TcpMeter` reads the counters of the open sockets of a set of processes and follows each
socket from one reading to the next, so a connection that closes loses only what it moved
after the reading before: a sum over open sockets would instead fall by all its life's bytes.
p2pd closes connections while it runs (sockets of ~55 KB were seen close in 2-peer runs on
loopback), and such a fall once put a 3-round `bench swarm` figure below what the daemons
themselves sent.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_INFO = 2
"""The attribute carrying a socket's tcp_info."""

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBBBI48x")  # inet_diag_req_v2: family, protocol, extensions, pad, states, any socket id
_INODE_AT = 68
"""Offset of idiag_inode in inet_diag_msg (family, state, timer, retrans, 48-byte socket id,
expires, rqueue, wqueue, uid, inode)."""
_MSG_LEN = 72
_BYTES_RECEIVED_AT, _BYTES_SENT_AT = 128, 200
"""Offsets of tcpi_bytes_received (Linux ≥ 4.1) and tcpi_bytes_sent (≥ 4.19) in tcp_info."""


class Unavailable(RuntimeError):
    """The counters cannot be read here (not Linux, sock_diag refused, an old kernel)."""


def socket_bytes() -> dict[int, tuple[int, int]]:
    """Every TCP socket of the machine (IPv4 and IPv6): inode → (bytes sent, bytes received)."""
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"per-socket TCP counters are read from Linux's sock_diag; this is {sys.platform}")
    out: dict[int, tuple[int, int]] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        out.update(_dump(family))
    return out


class TcpMeter:
    """Bytes a set of processes moved over TCP since the meter's first reading, summed per
    socket: each reading adds what every open socket moved since the reading before (all of it
    for a socket opened since). A socket that closes between two readings takes only what it
    moved after the first of them; read often (every half second, say) to keep that small. The
    totals are thus a lower bound, never a count made smaller by a connection that closed.
    Every reading is logged with its time, so the bytes of a window that other clocks mark (a
    daemon's rounds) can be had: `between`. `closed_sent` keeps what the sockets that closed
    since the first reading had sent over their lives: what a sum over open sockets drops."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[int, int]] | None = None
        self.sent = self.received = self.closed_sent = 0
        self.log: list[tuple[float, int, int, int]] = []
        """(Unix time, bytes sent, bytes received, closed_sent) at each reading, in order."""

    def read(self, pids: set[int], counters: dict[int, tuple[int, int]] | None = None,
             at: float | None = None) -> tuple[int, int]:
        """Take a reading of the open sockets of `pids` (from `counters`, a `socket_bytes()` taken
        at Unix time `at` for several meters at once, or a fresh one); (bytes sent, bytes
        received) since the first reading. Unavailable when the counters cannot be read."""
        if counters is None:
            at, counters = time.time(), socket_bytes()
        now = {inode: counters[inode] for pid in pids for inode in _socket_inodes(pid) if inode in counters}
        if self._seen is not None:
            for inode, (sent, received) in now.items():
                was_sent, was_received = self._seen.get(inode, (0, 0))
                if sent < was_sent or received < was_received:  # the inode of a closed socket, reused
                    was_sent = was_received = 0
                self.sent += sent - was_sent
                self.received += received - was_received
            self.closed_sent += sum(sent for inode, (sent, _) in self._seen.items() if inode not in now)
        self._seen = now
        self.log.append((time.time() if at is None else at, self.sent, self.received, self.closed_sent))
        return self.sent, self.received

    def between(self, start: float, end: float) -> tuple[int, int, int] | None:
        """(bytes sent, bytes received, closed_sent's growth) from the last reading at or before
        Unix time `start` to the first at or after `end`: a window that holds [start, end]
        whole. None when no reading brackets it."""
        before = [r for r in self.log if r[0] <= start]
        after = [r for r in self.log if r[0] >= end]
        if not before or not after:
            return None
        first, last = before[-1], after[0]
        return last[1] - first[1], last[2] - first[2], last[3] - first[3]


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[8:-1]))
    return inodes


def _dump(family: int) -> dict[int, tuple[int, int]]:
    request = _REQUEST.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, 0xFFFFFFFF)
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except OSError as e:
        raise Unavailable(f"no sock_diag netlink socket: {e.strerror or e}") from e
    out: dict[int, tuple[int, int]] = {}
    with sock:
        sock.sendto(_HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                    + request, (0, 0))
        while True:
            data = sock.recv(1 << 20)
            at = 0
            while at + _HEADER.size <= len(data):
                length, kind = _HEADER.unpack_from(data, at)[:2]
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, at + _HEADER.size)[0]
                    raise Unavailable(f"sock_diag refused the dump: {os.strerror(code)}")
                if length < _HEADER.size:
                    raise Unavailable(f"sock_diag sent a message of {length} bytes")
                _parse(data[at + _HEADER.size:at + length], out)
                at += (length + 3) & ~3


def _parse(body: bytes, out: dict[int, tuple[int, int]]) -> None:
    """One inet_diag_msg and its attributes: record the socket's counters when it has them."""
    if len(body) < _MSG_LEN:
        return
    inode = struct.unpack_from("=I", body, _INODE_AT)[0]
    at = _MSG_LEN
    while at + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, at)
        if length < 4:
            return
        if kind == INET_DIAG_INFO:
            info = body[at + 4:at + length]
            if len(info) < _BYTES_SENT_AT + 8:
                raise Unavailable("this kernel's tcp_info has no bytes_sent (Linux 4.19 or later has it)")
            out[inode] = (struct.unpack_from("=Q", info, _BYTES_SENT_AT)[0],
                          struct.unpack_from("=Q", info, _BYTES_RECEIVED_AT)[0])
        at += (length + 3) & ~3
