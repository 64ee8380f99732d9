"""A link emulator for the fault-injection tests: an Ethernet switch in user space that
delays every frame by a fixed time and drops a share of them at random, for kernels
without `sch_netem` (this one has none; its tc has no classifiers or actions either).

Run inside the router namespace with the router-side ends of the peers' veth pairs. Each
port is an AF_PACKET socket; the switch learns which MAC is behind which port, forwards a
frame to its port (floods broadcast and unknown destinations), drops it with probability
LOSS (ARP excepted, so that address resolution does not add seconds of timeouts), and
sends it DELAY_MS later. A frame crossing from one peer to another passes the switch once:
the round-trip time between two peers is 2 · DELAY_MS. Bandwidth is capped in the kernel
(tbf on each peer's interface), not here.

usage: python linkem.py DELAY_MS LOSS SEED IFACE [IFACE ...]
Prints "ready" once every port is open; runs until killed; on SIGTERM prints its counts.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import sys

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ETH_P_ARP = b"\x08\x06"


def main(delay_ms: float, loss: float, seed: int, ifaces: list[str]) -> None:
    rng = random.Random(seed)
    loop = asyncio.new_event_loop()
    ports = {}
    for name in ifaces:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((name, 0))
        s.setblocking(False)
        ports[name] = s
    where: dict[bytes, str] = {}
    counts = {"forwarded": 0, "dropped": 0}

    def send(name: str, frame: bytes) -> None:
        try:
            ports[name].send(frame)
        except OSError:
            pass  # the port is down (a partitioned peer): the frame is lost, as on a cut cable

    def receive(name: str) -> None:
        sock = ports[name]
        while True:
            try:
                frame, addr = sock.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING or len(frame) < 14:
                continue  # our own sends, seen again on the way out
            dst, src = frame[:6], frame[6:12]
            where[src] = name
            if frame[12:14] != ETH_P_ARP and rng.random() < loss:
                counts["dropped"] += 1
                continue
            out = [where[dst]] if dst in where and not dst[0] & 1 else [n for n in ports if n != name]
            for o in out:
                if o != name:
                    counts["forwarded"] += 1
                    loop.call_later(delay_ms / 1000, send, o, frame)

    for name, sock in ports.items():
        loop.add_reader(sock.fileno(), receive, name)

    def stop() -> None:
        print(f"forwarded {counts['forwarded']} dropped {counts['dropped']}", flush=True)
        loop.stop()

    loop.add_signal_handler(signal.SIGTERM, stop)
    print("ready", flush=True)
    loop.run_forever()


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
