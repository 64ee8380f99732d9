"""Bytes a process sent and received over TCP, from the kernel's own per-socket counters.

Linux keeps, for every TCP socket, the bytes sent and received over its life (`tcp_info`'s
`tcpi_bytes_sent` and `tcpi_bytes_received`, what `ss -ti` prints as bytes_sent and
bytes_received). They are read here over a sock_diag netlink socket (the interface `ss`
itself uses), so counting needs neither iproute2 nor root: every TCP socket of the machine
is listed with its inode, and a process's sockets are the inodes its /proc/PID/fd links
name. Loopback traffic is counted like any other, libp2p's encryption and framing included.

`tcp_io(pids)` sums the counters over the open sockets of `pids`; a socket closed between two
readings takes its bytes with it, so compare readings taken while the connections live.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

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


def tcp_io(pids: set[int]) -> tuple[int, int]:
    """(bytes sent, bytes received) over TCP by the open sockets of the processes `pids`.
    Unavailable when the counters cannot be read; a process gone counts nothing."""
    counters = socket_bytes()
    sent = received = 0
    for inode in {i for pid in pids for i in _socket_inodes(pid)}:
        s, r = counters.get(inode, (0, 0))
        sent, received = sent + s, received + r
    return sent, received


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
