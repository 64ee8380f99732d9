"""The idle governor: the volunteer's machine is theirs first. Like BOINC's computing
preferences, the daemon pauses while another process uses the GPU (a game), while other
processes use more than a share of the CPU, while on battery, or outside the allowed hours,
and resumes only after the machine has been idle for a while. A paused peer stays reachable
— it serves its state and last delta — but trains nothing and reports no progress, so rounds
do not count on it; `node status` says why it is paused.

The decision (`Governor.decide`) is a pure function of readings, so it is tested on
recorded ones; `read_machine` takes a reading with psutil and, for a peer that trains on a
CUDA GPU, NVML's process list of that GPU alone (node/gpuwatch.py). The machine's other
locoswarm peers (node/localpeers.py) count as neither CPU nor GPU use. A CPU or MPS peer
reads no GPU: its work does not compete with a game's there, and peers on a multi-GPU box
do not pause each other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from locoswarm.node.gpuwatch import GpuWatch
from locoswarm.node.localpeers import local_peer_pids

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class IdlePolicy:
    pause_on_gpu_use: bool = True
    """Pause while another process has the GPU this peer trains on (NVML's process lists);
    other locoswarm peers of the machine do not count, and a CPU or MPS peer watches no GPU."""
    max_other_cpu_percent: float = 0.0
    """Pause while other processes (not the machine's locoswarm peers) use more than this share of all CPUs (0: never)."""
    pause_on_battery: bool = True
    """Pause while the machine runs on battery."""
    allowed_hours: str = ""
    """Local hours when training is allowed, "H1-H2" (may wrap midnight: "22-8"); empty: always."""
    resume_after_idle_min: float = 0.0
    """After a pause, resume only once the machine has been idle this many minutes."""

    def validate(self) -> None:
        if not 0 <= self.max_other_cpu_percent <= 100:
            raise ValueError(f"max_other_cpu_percent must lie in [0, 100], got {self.max_other_cpu_percent}")
        if self.resume_after_idle_min < 0:
            raise ValueError(f"resume_after_idle_min must be >= 0, got {self.resume_after_idle_min}")
        parse_hours(self.allowed_hours)


def parse_hours(text: str) -> tuple[int, int] | None:
    """"H1-H2" → (H1, H2), hours 0..24; empty → None; anything else is a ValueError naming it."""
    if not text:
        return None
    try:
        start, end = (int(part) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"allowed_hours must look like '22-8' (local hours), got {text!r}") from None
    if not (0 <= start <= 24 and 0 <= end <= 24) or start == end:
        raise ValueError(f"allowed_hours {text!r}: hours must lie in 0..24 and differ")
    return start, end


def in_hours(hour: int, window: tuple[int, int] | None) -> bool:
    if window is None:
        return True
    start, end = window
    return start <= hour < end if start < end else hour >= start or hour < end


@dataclass(frozen=True, slots=True)
class Reading:
    time_s: float
    """When (seconds, any monotonic origin)."""
    local_hour: int
    other_cpu_percent: float
    """Share of all CPUs used by processes other than the machine's peers and their p2pd."""
    on_battery: bool | None
    """None: no battery, or unknown."""
    gpu_processes: tuple[str, ...] = field(default_factory=tuple)
    """Processes other than locoswarm peers using the GPU this peer trains on (names)."""


class Governor:
    def __init__(self, policy: IdlePolicy) -> None:
        policy.validate()
        self.policy = policy
        self.window = parse_hours(policy.allowed_hours)
        self.last_busy_s: float | None = None

    def decide(self, r: Reading) -> str | None:
        """Why to pause now, or None to train."""
        p = self.policy
        reasons = []
        if p.pause_on_gpu_use and r.gpu_processes:
            reasons.append(f"another process uses the GPU ({', '.join(r.gpu_processes[:3])})")
        if p.max_other_cpu_percent and r.other_cpu_percent > p.max_other_cpu_percent:
            reasons.append(f"other processes use {r.other_cpu_percent:.0f} % of the CPUs "
                           f"(limit {p.max_other_cpu_percent:g} %)")
        if p.pause_on_battery and r.on_battery:
            reasons.append("on battery")
        if not in_hours(r.local_hour, self.window):
            reasons.append(f"outside the allowed hours {p.allowed_hours}")
        if reasons:
            self.last_busy_s = r.time_s
            return "; ".join(reasons)
        if self.last_busy_s is not None and p.resume_after_idle_min > 0:
            idle_s = r.time_s - self.last_busy_s
            if idle_s < 60 * p.resume_after_idle_min:
                return f"idle for {idle_s / 60:.1f} of the {p.resume_after_idle_min:g} minutes required to resume"
        return None


class IdleWatch:
    """The daemon's use of the governor: read the machine every `every_s`, and on a change
    log it and, when pausing, call `on_pause` (the daemon ends the round's training)."""

    def __init__(self, governor: Governor, every_s: float, on_pause, *, peers_dir: Path | None = None) -> None:
        """`peers_dir`: where the machine's peers list themselves (localpeers.registry_dir() when None)."""
        self.governor = governor
        self.every_s = every_s
        self.on_pause = on_pause
        self.peers_dir = peers_dir
        self.gpu: GpuWatch | None = None
        """The GPU this peer trains on, set once the device is known; None: no GPU is watched."""
        self.paused: str | None = None
        """Why training is paused (None: it is not)."""

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.check()

    async def check(self) -> None:
        gpu = self.gpu if self.governor.policy.pause_on_gpu_use else None
        try:
            reason = self.governor.decide(await asyncio.to_thread(
                lambda: read_machine(peer_processes(self.peers_dir), gpu)))
        except Exception as e:  # a sensor that fails must not stop the daemon: keep the last decision
            log.info("machine reading failed: %s", e)
            return
        if reason != self.paused:
            if reason is None:
                log.info("resuming: the machine is idle")
            else:
                log.info("pausing: %s", reason)
                self.on_pause()  # step aside now; what was trained this round is still sent
            self.paused = reason


_PROCS: dict = {}


def peer_processes(peers_dir: Path | None = None) -> set[int]:
    """This daemon, the machine's other peers (listed in `peers_dir`: node/localpeers.py)
    and their children (p2pd): the processes whose use of the CPU and the GPU is not the
    volunteer's. Two peers of one machine must not pause for each other."""
    import psutil

    peers = {os.getpid()} | local_peer_pids(peers_dir)
    pids = set(peers)
    for pid in peers:
        try:
            pids |= {child.pid for child in psutil.Process(pid).children()}
        except psutil.Error:
            pass  # it ended since it was listed
    return pids


def read_machine(own_pids: set[int], gpu: GpuWatch | None = None) -> Reading:
    """A reading of this machine now. `own_pids`: this daemon, the machine's other peers and
    their p2pd (`peer_processes`), whose use does not count as the volunteer's; `gpu`: the
    GPU to watch for other processes (None: none, and NVML is not loaded)."""
    import psutil

    total = psutil.cpu_percent(interval=None)
    own = 0.0
    for pid in own_pids:
        try:
            # The same Process object each time: cpu_percent measures since its previous call.
            own += _PROCS.setdefault(pid, psutil.Process(pid)).cpu_percent(interval=None)
        except psutil.Error:
            _PROCS.pop(pid, None)
    other = max(0.0, total - own / (psutil.cpu_count() or 1))
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    on_gpu = () if gpu is None else gpu.others(own_pids)
    return Reading(time_s=time.monotonic(), local_hour=time.localtime().tm_hour, other_cpu_percent=other,
                   on_battery=None if battery is None else not battery.power_plugged, gpu_processes=on_gpu)
