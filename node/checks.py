"""Checks of a volunteer's settings that can be made before anything starts, no state
directory created and no p2pd started: multiaddrs parsed as p2pd will read them, listen
addresses bound for a moment to see whether the port is free, device names.

Why before: a malformed --peer used to fail only once p2pd had started (8–36 s later), in
p2pd's words and without naming the flag, and a listen port held by another locoswarm
daemon was shared with it instead of refused (go-libp2p binds with SO_REUSEPORT, so a
second p2pd's bind succeeds and the kernel splits the connections between the two).

A failed check is a SettingError naming the setting and the value; userconfig.describe
turns it into a line saying where the value was set (flag, environment, config file).
"""

from __future__ import annotations

import errno
import os
import re
import socket
from typing import Any

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
"""The device names pick_device knows: cuda:N picks the N-th CUDA device."""

LISTEN_TRANSPORTS = {("tcp",), ("tcp", "ws"), ("udp", "quic-v1")}
"""What may follow the IP of a listen address: the transports of hivemind's p2pd. Anything else
left p2pd listening on nothing: a bare /udp or /p2p-circuit ended the daemon in a traceback,
/udp/N/quic (QUIC draft-29, gone from go-libp2p) in "no transport for protocol"."""


class SettingError(ValueError):
    """A setting's value that cannot work, before anything was started for it."""

    def __init__(self, setting: str, value: Any, problem: str) -> None:
        super().__init__(f"{setting} {shown(value)}: {problem}")
        self.setting = setting
        """The setting's name, as in config.SETTINGS ("micro_batch", "peers")."""
        self.value = value
        """The value that is wrong: for a list, the one element."""
        self.problem = problem
        """What is wrong with it, and what would do instead."""


def shown(value: Any) -> str:
    """`value` as a user typed it: bare, quoted only where it would not read as one word."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a float setting given as 3 shows as 3, not 3.0
    text = str(value)
    return text if text and not any(c.isspace() for c in text) else repr(text)


def check_device(setting: str, name: str) -> None:
    if not DEVICE.match(name):
        raise SettingError(setting, name, "must be auto, cpu, mps, cuda or cuda:<index>")


def _names(setting: str, maddr: str) -> list[str]:
    """The protocol names of `maddr` as hivemind's Multiaddr parses it (what hivemind hands
    p2pd), or a SettingError saying what in it is wrong; ports outside 0..65535 are named as
    such. Where hivemind is not installed (Windows, node/portable.py transport_problem), the
    addresses are read by `_plain_names`, so that settings are still checked there."""
    if not maddr.startswith("/"):
        raise SettingError(setting, maddr, "not a multiaddr: it must look like /ip4/203.0.113.5/tcp/31337")
    for proto, port in re.findall(r"/(tcp|udp)/([^/]*)", maddr):
        if not port.isdigit() or int(port) > 65535:
            raise SettingError(setting, maddr, f"{proto} port {port or '(none)'} is not in 0..65535")
    from locoswarm.node.portable import hivemind_kept_out

    if hivemind_kept_out():  # a py-libp2p peer: hivemind must not load in its process
        return _plain_names(setting, maddr)
    try:
        from hivemind.utils.multiaddr import Multiaddr
        from hivemind.utils.multiaddr.exceptions import Error
    except ImportError:
        return _plain_names(setting, maddr)
    try:
        return [p.name for p in Multiaddr(maddr).protocols()]
    except Error as e:
        if "protocol p2p" in str(e):
            peer = maddr.rpartition("/p2p/")[2].split("/")[0]
            raise SettingError(setting, maddr, f"{peer!r} is not a peer id (a base58 id the peer printed, "
                                               "Qm… or 12D3KooW…)") from None
        # The parser's message begins by repeating the whole address: keep what follows it.
        reason = str(e).split(f"{maddr!r}", 1)[-1].lstrip(" :") or str(e)
        raise SettingError(setting, maddr, f"not a valid multiaddr: {reason}") from None


_PLAIN_ARGS = {"ip4": "ip4", "ip6": "ip6", "dns": "name", "dns4": "name", "dns6": "name", "dnsaddr": "name",
               "tcp": "port", "udp": "port", "sctp": "port", "p2p": "peer", "ipfs": "peer", "quic": None,
               "quic-v1": None,
               "ws": None, "wss": None, "tls": None, "noise": None, "p2p-circuit": None, "webtransport": None}
"""The multiaddr protocols a swarm's addresses use, and what each takes: what `_plain_names`
knows without hivemind's parser."""
_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{30,}$")


def _plain_names(setting: str, maddr: str) -> list[str]:
    """`maddr`'s protocol names read without hivemind: each protocol must be one of
    `_PLAIN_ARGS` and its argument valid (an IP address, a name, a port, a base58 peer id)."""
    import ipaddress

    parts, names = maddr.split("/")[1:], []
    while parts:
        name = parts.pop(0)
        if name not in _PLAIN_ARGS:
            raise SettingError(setting, maddr, f"not a valid multiaddr: unknown protocol {name!r}")
        names.append("p2p" if name == "ipfs" else name)  # the old name of /p2p, as hivemind's parser reads it
        kind = _PLAIN_ARGS[name]
        if kind is None:
            continue
        if not parts or not parts[0]:
            raise SettingError(setting, maddr, f"not a valid multiaddr: /{name} needs a value")
        value = parts.pop(0)
        try:
            if kind == "ip4":
                ipaddress.IPv4Address(value)
            elif kind == "ip6":
                ipaddress.IPv6Address(value)
        except ValueError:
            raise SettingError(setting, maddr, f"not a valid multiaddr: {value!r} is not an {name} address") from None
        if kind == "peer" and not _BASE58.match(value):
            raise SettingError(setting, maddr, f"{value!r} is not a peer id (a base58 id the peer printed, "
                                               "Qm… or 12D3KooW…)")
    if not names:
        raise SettingError(setting, maddr, "not a multiaddr: it must look like /ip4/203.0.113.5/tcp/31337")
    return names


def check_peer(setting: str, maddr: str) -> None:
    """A multiaddr to dial: an address and the peer's id at its end, /p2p/<id>; without the id
    p2pd cannot tell whom it reached, and says only "invalid p2p multiaddr"."""
    names = _names(setting, maddr)
    if names[-1] != "p2p" or len(names) < 2:
        raise SettingError(setting, maddr, "names no peer: give the whole address the peer printed, ending in "
                                           "/p2p/<peer id> (/ip4/203.0.113.5/tcp/31337/p2p/QmPeer…)")


def check_announce(setting: str, maddr: str) -> None:
    _names(setting, maddr)


def check_listen(setting: str, maddr: str) -> None:
    """An address to listen on: an IP and a TCP or UDP port, no peer id (p2pd listens as this
    node's own identity). Whether p2pd can listen there now is check_bind's question."""
    names = _names(setting, maddr)
    if "p2p" in names:
        raise SettingError(setting, maddr, "a listen address names no peer: drop its /p2p/<id> (the id is this "
                                           "node's own, from its state directory)")
    if names[:1] not in (["ip4"], ["ip6"]) or tuple(names[1:]) not in LISTEN_TRANSPORTS:
        raise SettingError(setting, maddr, "must be an IP address of this machine and a port of a transport p2pd "
                                           "listens on, like /ip4/0.0.0.0/tcp/31337 or /ip4/0.0.0.0/udp/31337/quic-v1")


def check_bind(setting: str, maddr: str) -> None:
    """p2pd could listen on `maddr` now: its IP is this machine's and its port, if not 0, is
    free (bind_problem). Apart from check_listen because it asks the machine, not the value:
    `doctor` checks the settings while the daemon may hold the port."""
    problem = bind_problem(maddr)
    if problem:
        raise SettingError(setting, maddr, problem)


def bind_problem(maddr: str) -> str | None:
    """Why p2pd could not listen on `maddr` (an /ip4 or /ip6 address with a tcp or udp port),
    found by binding a plain socket there for a moment; None when it could (or `maddr` is not
    such an address). A port in use by a go-libp2p program, locoswarm's p2pd among them,
    counts as in use although that program would let another of its kind share it."""
    m = re.match(r"^/ip([46])/([^/]+)/(tcp|udp)/(\d+)", maddr)
    if not m:
        return None
    family = socket.AF_INET if m[1] == "4" else socket.AF_INET6
    host, proto, port = m[2], m[3], int(m[4])
    try:
        with socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM) as probe:
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as Go listens on an /ip6 address
            if proto == "tcp":
                # SO_REUSEADDR as every TCP listener sets it, so the closing connections of a peer
                # stopped a moment ago (TIME_WAIT) do not count as a holder; no SO_REUSEPORT, so
                # that a listener which set it (go-libp2p does) still holds the port against us.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:  # creating the socket fails too where the machine has no IPv6
        if e.errno == errno.EADDRINUSE:
            return f"port {port} is in use (another locoswarm peer or libp2p program?)"
        if e.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this machine"
        return f"cannot listen there: {e.strerror or e}"
    return None


def check_state_dir(setting: str, path: str) -> None:
    """A folder, or a path where none exists yet (whether it can be made is found when the
    daemon makes it: statedir.open_state_dir says so, before p2pd starts)."""
    if not path:
        raise SettingError(setting, path, "must name a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise SettingError(setting, path, "exists and is not a folder")
