"""Who else uses the GPU this peer trains on, for the idle governor (node/governor.py):
NVML's compute and graphics process lists of that one GPU, less this daemon, its children
and the other locoswarm peers of the machine (node/localpeers.py). A peer that trains on
the CPU or on Apple MPS has no GpuWatch: it watches no GPU and never loads NVML.

Which NVML device is ours: torch numbers the CUDA devices this process sees (after
CUDA_VISIBLE_DEVICES, in CUDA_DEVICE_ORDER), NVML numbers all of the machine's GPUs by PCI
bus, so the two indices differ on any box where CUDA_VISIBLE_DEVICES is set. The GPU's UUID
(hardware.GpuId) is the same in both; its PCI bus id is the fallback (a MIG slice's UUID is
not an NVML device's, its bus is its parent's). A GPU NVML does not list is a reason to
watch them all, with a warning, rather than none: pausing for a game elsewhere costs less
than training through one.
"""

from __future__ import annotations

import logging

from locoswarm.node.hardware import GpuId

log = logging.getLogger(__name__)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_uuid(value) -> str:
    """NVML's "GPU-8f…" (str or bytes) as hardware.GpuId.uuid spells it."""
    return _text(value).lower().removeprefix("gpu-").removeprefix("mig-")


def nvml_bus(value) -> str:
    """NVML's bus id "00000000:3B:00.0" (8-digit domain; str or bytes) as GpuId.pci_bus_id spells it."""
    domain, bus, rest = _text(value).lower().split(":")
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{rest}"


class GpuWatch:
    """The processes on one GPU. `nvml`: the NVML bindings (pynvml, the module of
    `nvidia-ml-py`; a test passes a fake); None imports pynvml at each reading, and without
    it nothing is seen."""

    def __init__(self, gpu: GpuId, nvml=None) -> None:
        self.gpu = gpu
        self.nvml = nvml
        self._warned = False

    def others(self, ignore: set[int]) -> tuple[str, ...]:
        """The names of the processes `pids` finds, sorted."""
        return tuple(sorted({_name(pid) for pid in self.pids(ignore)}))

    def pids(self, ignore: set[int]) -> set[int]:
        """The processes on our GPU whose pids are not in `ignore` (this daemon, its children,
        the machine's other peers) and that this process can see; empty where NVML cannot
        be read. Inside a container NVML gives the host's pids, which name nothing here:
        such a pid is this daemon itself as often as anything else, and a container cannot
        tell a game on the host from itself, so it is left out (docs/hardware.md)."""
        nvml = self.nvml
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                return set()  # no NVML bindings: GPU use by others cannot be seen
        try:
            nvml.nvmlInit()
        except Exception:  # no NVIDIA driver: nothing to watch
            return set()
        try:
            pids = set()
            for handle in self._handles(nvml):
                for proc in (nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                             + nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)):
                    pids.add(proc.pid)
        except Exception as e:  # a driver hiccup: no reading rather than a stopped daemon
            log.debug("NVML reading failed: %s", e)
            return set()
        finally:
            nvml.nvmlShutdown()
        return {pid for pid in pids - ignore if _visible(pid)}

    def _handles(self, nvml) -> list:
        """Our GPU's NVML handle, or every GPU's where none matches (warned once)."""
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        if self.gpu.uuid:
            mine = [h for h in handles if nvml_uuid(nvml.nvmlDeviceGetUUID(h)) == self.gpu.uuid]
            if mine:
                return mine
        if self.gpu.pci_bus_id:
            mine = [h for h in handles if nvml_bus(nvml.nvmlDeviceGetPciInfo(h).busId) == self.gpu.pci_bus_id]
            if mine:
                return mine
        if not self._warned:
            log.warning("NVML lists no GPU with UUID %r or PCI bus %r: watching every GPU for other processes",
                        self.gpu.uuid, self.gpu.pci_bus_id)
            self._warned = True
        return handles


def _visible(pid: int) -> bool:
    import psutil

    try:
        return psutil.pid_exists(pid)
    except (OverflowError, ValueError):  # not a pid of this system
        return False


def _name(pid: int) -> str:
    import psutil

    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return f"pid {pid}"
