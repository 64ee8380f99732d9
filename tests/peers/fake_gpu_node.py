"""A real daemon that trains on the CPU but believes it trains on a GPU, whose processes a
fake NVML reads from a file (one pid per line, rewritten by the test as processes come and
go): the governor's whole path — the daemon's GPU, the machine's peer registry, the pause
and the resume — run on a machine without a GPU. The production command, `locoswarm node
join`, runs in this process with these two fakes handed in; production code reads no test
settings.

usage: python fake_gpu_node.py PIDS_FILE -- node join JOIN-ARGS...
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

from locoswarm.node import daemon
from locoswarm.node.hardware import GpuId

GPU = GpuId(uuid="5eed0000-0000-0000-0000-000000000001", pci_bus_id="0000:01:00.0")


class FileNvml(types.ModuleType):
    """pynvml's calls the governor makes, for the one GPU `GPU`, whose compute processes are
    the pids in a file."""

    def __init__(self, path: str) -> None:
        super().__init__("pynvml")
        self.path = path

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{GPU.uuid}"

    def nvmlDeviceGetPciInfo(self, handle):
        return SimpleNamespace(busId="00000000:01:00.0")

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        try:
            with open(self.path) as f:
                return [SimpleNamespace(pid=int(line)) for line in f.read().split()]
        except FileNotFoundError:
            return []

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return []


def main() -> None:
    split = sys.argv.index("--")
    sys.modules["pynvml"] = FileNvml(sys.argv[1])
    daemon.gpu_id = lambda device: GPU
    from locoswarm.cli.main import main as cli

    sys.argv = ["locoswarm", *sys.argv[split + 1:]]
    cli()


if __name__ == "__main__":
    main()
