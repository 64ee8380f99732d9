"""A CUDA kernel shipped as PTX text, compiled by the driver's own JIT and launched on
torch's current stream through the CUDA driver API (ctypes, libcuda): no toolkit, nvcc
or compiler on the volunteer's machine.

Why not Triton for every kernel: Triton has no scatter into shared memory, and a kernel
that adds many peers' sparse values into a dense buffer without atomics needs one
(kernels/accumulate.cu says how it is used). Triton 3.6 cannot compile a PTX file either
(IRSource has no module for it), so the driver does it here. Where the driver is missing
or refuses the PTX, `load` raises CudaModuleError and the caller falls back to Triton.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch


class CudaModuleError(RuntimeError):
    """The driver API is missing, or it refused to load or launch a kernel."""


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_functions: dict[tuple[str, str, int], ctypes.c_void_p] = {}


def _driver() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaModuleError(f"the CUDA driver library is not loadable: {e}") from e
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
        lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        _lib = lib
    return _lib


def _check(result: int, what: str) -> None:
    if result != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(text))
        raise CudaModuleError(f"{what} failed: CUDA error {result} ({(text.value or b'?').decode()})")


def load(ptx: Path, name: str, device: torch.device) -> ctypes.c_void_p:
    """The kernel `name` of the PTX file, loaded into `device`'s primary context (torch's),
    once per process and device."""
    key = (str(ptx), name, device.index if device.index is not None else torch.cuda.current_device())
    with _lock:
        if key not in _functions:
            with torch.cuda.device(key[2]):
                torch.cuda.current_stream()  # makes torch's primary context current on this thread
                lib = _driver()
                ctx = ctypes.c_void_p()
                _check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
                if not ctx.value:
                    raise CudaModuleError("no current CUDA context after torch's initialisation")
                module = ctypes.c_void_p()
                _check(lib.cuModuleLoadData(ctypes.byref(module), ptx.read_bytes() + b"\0"), f"loading {ptx.name}")
                function = ctypes.c_void_p()
                _check(lib.cuModuleGetFunction(ctypes.byref(function), module, name.encode()), f"finding {name}")
                _functions[key] = function
        return _functions[key]


def launch(function: ctypes.c_void_p, grid: int, block: int, args: list, device: torch.device) -> None:
    """Launches `function` with `grid` × `block` threads on torch's current stream of
    `device`; `args` are ctypes scalars in the kernel's parameter order (device pointers as
    c_uint64)."""
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
    with torch.cuda.device(device):  # the function's context (the device's primary one) is current
        stream = torch.cuda.current_stream(device).cuda_stream
        _check(_driver().cuLaunchKernel(function, grid, 1, 1, block, 1, 1, 0, ctypes.c_void_p(stream), params, None),
               "cuLaunchKernel")
