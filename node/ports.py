"""Addresses that survive a restart: our listen ports, and the peers we last saw.

Listen ports. A peer listening on port 0 gets whatever port the
OS picks, so the address it printed for others, and the one other peers remember it by,
would die with it at every restart; peers that knew only that address could not find it
again. So the ports p2pd first listened on are kept in the state directory and asked for
again when the daemon restarts on it. A port given explicitly (not 0) is used as given;
`keep_ports = false` turns the memory off. With `--announce`, p2pd reports the announced
addresses, not the ports it listens on, so nothing is kept (a peer that announces a
forwarded port gives its listen port explicitly anyway).

`ports.json` is a file on disk, read as untrusted: anything but {"tcp": port, "udp": port}
with ports in 1..65535 is ignored (a fresh port is taken, and the file rewritten).

Peers last seen. The initial peers a volunteer was given may be gone for good (the
organiser's bootstrap machine rebooted on a new address) while the swarm trains on. So
the addresses of up to MAX_SEEN peers of the last view are kept in `peers.json`, and a
restart that reaches none of its initial peers dials those too. Read as untrusted: only
multiaddrs ending in /p2p/<id> are taken.
"""

from __future__ import annotations

import json
import logging
import os
import re

from locoswarm.node.files import write_atomic

log = logging.getLogger(__name__)
PORTS_FILE = "ports.json"
PEERS_FILE = "peers.json"
MAX_SEEN = 32
"""Peers of the last view kept for the next start."""
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


def seen_peers(state_dir: str) -> list[str]:
    """The multiaddrs (with /p2p/<id>) of the peers seen last time; empty when none are kept."""
    path = os.path.join(state_dir, PEERS_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            stored = json.loads(fh.read(64 * 1024))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("%s unreadable (%s): not dialing the peers seen last time", path, e)
        return []
    if not isinstance(stored, list):
        return []
    return [a for a in stored if isinstance(a, str) and a.startswith("/") and len(a) <= 512
            and "/p2p/" in a and a.rpartition("/p2p/")[2].isalnum()][:MAX_SEEN]


def remember_peers(state_dir: str, records) -> None:
    """Keep the first TCP address of each of `records` (peer records of the current view)
    for the next start; unchanged sets are not rewritten."""
    maddrs = []
    for r in records[:MAX_SEEN]:
        addr = next((a for a in r.addrs if "/tcp/" in a), r.addrs[0])
        maddrs.append(addr if "/p2p/" in addr else f"{addr}/p2p/{r.peer_id}")
    if not maddrs or sorted(maddrs) == sorted(seen_peers(state_dir)):
        return
    try:
        write_atomic(os.path.join(state_dir, PEERS_FILE), json.dumps(maddrs) + "\n")
    except OSError as e:
        log.warning("could not keep the peers seen in %s: %s", state_dir, e.strerror or e)
