"""Network namespaces for the fault-injection tests: N peer namespaces on one Ethernet
segment (10.77.0.0/24) through a router namespace that runs the user-space link emulator
(linkem.py: fixed delay, random loss), each peer's egress capped by the kernel's tbf
qdisc. A peer is partitioned by taking its interface down and healed by bringing it up.
Everything is created under names unique to this process and removed by `close`.

Why not tc netem: this machine's kernel has no sch_netem (nor tc classifiers/actions);
tbf is there. The emulator sees frames through AF_PACKET sockets, so the peers' checksum
and segmentation offloads are switched off (SIOCETHTOOL), else it would forward frames
with partial checksums or larger than the link's MTU.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import sys

LINKEM = os.path.join(os.path.dirname(__file__), "linkem.py")
_SIOCETHTOOL = 0x8946
_OFFLOADS = (0x17, 0x19, 0x1F, 0x24, 0x2B)
"""ETHTOOL_STXCSUM, _SSG, _STSO, _SGSO, _SGRO."""


class NamespaceUnavailable(Exception):
    """Namespaces cannot be made here (not root, no CAP_NET_ADMIN, no iproute2)."""


def offloads_off(ifname: str) -> None:
    """Switch off an interface's checksum and segmentation offloads (run inside its namespace)."""
    for cmd in _OFFLOADS:
        value = ctypes.create_string_buffer(struct.pack("II", cmd, 0))
        request = struct.pack("16sP", ifname.encode(), ctypes.addressof(value))
        with socket.socket() as s:
            try:
                fcntl.ioctl(s.fileno(), _SIOCETHTOOL, request)
            except OSError:
                pass  # an offload the driver does not have


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NamespaceUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Net:
    def __init__(self, num_peers: int, *, rate_mbit: float = 50.0, delay_ms: float = 25.0, loss: float = 0.01,
                 seed: int = 0) -> None:
        self.prefix = f"ls{os.getpid() % 100000}"
        self.router = f"{self.prefix}-r"
        self.peers = [f"{self.prefix}-{i}" for i in range(num_peers)]
        self.addrs = [f"10.77.0.{i + 1}" for i in range(num_peers)]
        self._made: list[str] = []
        self.linkem: subprocess.Popen | None = None
        try:
            _ip("netns", "add", self.router)
            self._made.append(self.router)
            ports = []
            for i, ns in enumerate(self.peers):
                _ip("netns", "add", ns)
                self._made.append(ns)
                inner, outer = f"{self.prefix}v{i}", f"{self.prefix}r{i}"
                _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "netns", self.router)
                _ip("-n", self.router, "link", "set", outer, "up")
                _ip("-n", ns, "link", "set", inner, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.run(i, [sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                                                   "import netns; netns.offloads_off('eth0')"])
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                                "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "400ms"], check=True,
                               capture_output=True)
                ports.append(outer)
            self.linkem = subprocess.Popen(["ip", "netns", "exec", self.router, sys.executable, LINKEM,
                                            str(delay_ms), str(loss), str(seed), *ports],
                                           stdout=subprocess.PIPE, text=True)
            if self.linkem.stdout.readline().strip() != "ready":
                raise NamespaceUnavailable("the link emulator did not start")
        except (NamespaceUnavailable, FileNotFoundError, subprocess.CalledProcessError) as e:
            self.close()
            raise NamespaceUnavailable(str(e)) from None

    def run(self, i: int, argv: list[str]) -> None:
        subprocess.run(self.argv(i, argv), check=True, capture_output=True)

    def argv(self, i: int, argv: list[str]) -> list[str]:
        """`argv` run inside peer i's namespace."""
        return ["ip", "netns", "exec", self.peers[i], *argv]

    def partition(self, i: int) -> None:
        _ip("-n", self.peers[i], "link", "set", "eth0", "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.peers[i], "link", "set", "eth0", "up")
        _ip("-n", self.peers[i], "addr", "replace", f"{self.addrs[i]}/24", "dev", "eth0")

    def close(self) -> str:
        """Remove everything; returns the emulator's counts line."""
        counts = ""
        if self.linkem is not None and self.linkem.poll() is None:
            self.linkem.terminate()
            try:
                counts = self.linkem.communicate(timeout=10)[0].strip()
            except subprocess.TimeoutExpired:
                self.linkem.kill()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made = []
        return counts
