"""Listen ports that survive a restart. A peer listening on port 0 gets whatever port the
OS picks, so the address it printed for others, and the one other peers remember it by,
would die with it at every restart; peers that knew only that address could not find it
again. So the ports p2pd first listened on are kept in the state directory and asked for
again when the daemon restarts on it. A port given explicitly (not 0) is used as given;
`keep_ports = false` turns the memory off. With `--announce`, p2pd reports the announced
addresses, not the ports it listens on, so nothing is kept (a peer that announces a
forwarded port gives its listen port explicitly anyway).

`ports.json` is a file on disk, read as untrusted: anything but {"tcp": port, "udp": port}
with ports in 1..65535 is ignored (a fresh port is taken, and the file rewritten).
"""

from __future__ import annotations

import json
import logging
import os
import re

from locoswarm.node.files import write_atomic

log = logging.getLogger(__name__)
PORTS_FILE = "ports.json"
_ANY_PORT = re.compile(r"^(/ip[46]/[^/]+)/(tcp|udp)/0(/.*)?$")
_PORT = re.compile(r"^/ip[46]/[^/]+/(tcp|udp)/(\d+)")


def remembered(state_dir: str) -> dict[str, int]:
    """The ports kept from an earlier run, by transport ("tcp", "udp"); empty when none are."""
    path = os.path.join(state_dir, PORTS_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            stored = json.loads(fh.read(4096))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s unreadable (%s): listening on new ports", path, e)
        return {}
    if not isinstance(stored, dict):
        return {}
    return {k: v for k, v in stored.items() if k in ("tcp", "udp") and type(v) is int and 0 < v < 65536}


def pinned(listen: list[str], ports: dict[str, int]) -> list[str]:
    """`listen` with each port-0 address on a remembered port of its transport."""
    out = []
    for maddr in listen:
        m = _ANY_PORT.match(maddr)
        if m and m[2] in ports:
            maddr = f"{m[1]}/{m[2]}/{ports[m[2]]}{m[3] or ''}"
        out.append(maddr)
    return out


def listened(maddrs: list[str]) -> dict[str, int]:
    """The first TCP and the first UDP port among the addresses p2pd listens on."""
    out: dict[str, int] = {}
    for maddr in maddrs:
        m = _PORT.match(maddr)
        if m and int(m[2]) > 0:
            out.setdefault(m[1], int(m[2]))
    return out


def remember(state_dir: str, ports: dict[str, int]) -> None:
    """Keep `ports` for the next start (atomically; a failure to write is logged, not fatal)."""
    if not ports or ports == remembered(state_dir):
        return
    try:
        write_atomic(os.path.join(state_dir, PORTS_FILE), json.dumps(ports) + "\n")
    except OSError as e:
        log.warning("could not keep the listen ports in %s: %s", state_dir, e.strerror or e)
