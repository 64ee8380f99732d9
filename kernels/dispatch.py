"""Which implementation of the compression kernels runs on a device: the fused Triton/CUDA
kernels of kernels/fused.py where they can run, else the plain-torch references. Both give
the same bits, so the choice changes speed, never results. kernels/fused.py is imported
only when chosen: importing it imports Triton, which CPU and MPS peers never need.
"""

from __future__ import annotations

import os

import torch


def fused_kernels(device: torch.device | str):
    """kernels.fused when it can run on `device` (CUDA with Triton, or Triton's CPU
    interpreter under TRITON_INTERPRET=1), else None: CPU and MPS take the torch path and
    never import Triton."""
    if not (torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    from locoswarm.kernels import fused

    return fused if fused.triton is not None else None
