"""A process on a machine with one NVIDIA GPU, as far as torch can tell, where nothing may
touch that GPU: `torch.cuda.is_available()` says True (or False with `absent`),
`device_count()` 1 and torch.accelerator CUDA, but whatever would initialise CUDA and so
create a context on the GPU — torch.cuda._lazy_init and torch.cuda.init, through which
every context-creating torch.cuda call and every tensor put on "cuda" goes, torch's
accelerator calls (current stream, device index, memory: torch.optim's step asks for the
current stream), and Tensor.pin_memory — or load NVML (pynvml)
is written to RECORD with its stack, then raises. The test reads RECORD, so a caller that
swallowed the error is caught all the same. This runs the production command (or a
script) in this process; production code reads no test settings.

usage: python no_cuda.py RECORD present|absent -- locoswarm ARGS...   the console script
       python no_cuda.py RECORD present|absent -- SCRIPT.py ARGS...   a script, run as __main__
"""

from __future__ import annotations

import runpy
import sys
import traceback
import types

import torch


ACCELERATOR_CALLS = [name for name in dir(torch._C) if name.startswith("_accelerator_") and name not in (
    "_accelerator_getAccelerator", "_accelerator_hooks_device_count", "_accelerator_isAllocatorInitialized")]
"""torch.accelerator's calls that would initialise a CUDA accelerator."""


def poisoned(record: str, what: str):
    def touch(*args, **kwargs):
        with open(record, "a") as f:
            f.write(f"{what}\n{''.join(traceback.format_stack()[:-1])}\n")
        raise RuntimeError(f"{what}: a process that must not touch the GPU initialised CUDA or NVML")

    return touch


class PoisonedModule(types.ModuleType):
    def __init__(self, name: str, record: str) -> None:
        super().__init__(name)
        self._record = record

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return poisoned(self._record, f"{self.__name__}.{attr}")


def main() -> None:
    split = sys.argv.index("--")
    record, presence = sys.argv[1:split]
    assert presence in ("present", "absent"), presence
    present = presence == "present"
    torch.cuda.is_available = lambda: present
    torch.cuda.device_count = lambda: int(present)
    torch.backends.cuda.is_built = lambda: True  # a CUDA build, as the volunteers' torch is
    torch.cuda._lazy_init = poisoned(record, "torch.cuda._lazy_init")
    torch.cuda.init = poisoned(record, "torch.cuda.init")
    torch.Tensor.pin_memory = poisoned(record, "torch.Tensor.pin_memory")
    # torch.accelerator is CUDA on a CUDA build; its calls for a device, stream or memory
    # initialise it (torch.utils' maybe_initialize_device) before they answer.
    torch._C._accelerator_getAccelerator = lambda: torch.device("cuda") if present else None
    for name in ACCELERATOR_CALLS:
        setattr(torch._C, name, poisoned(record, f"torch._C.{name}"))
    for name in ("pynvml", "nvidia_smi"):
        sys.modules[name] = PoisonedModule(name, record)
    rest = sys.argv[split + 1:]
    if rest[0].endswith(".py"):
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")
        return
    assert rest[0] == "locoswarm", rest
    from locoswarm.cli.main import main as cli

    sys.argv = rest
    cli()


if __name__ == "__main__":
    main()
