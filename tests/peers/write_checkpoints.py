"""A real process for the checkpoint crash tests: writes checkpoints of rounds n+1, n+2 …
(n: the newest already there)
into the folder given as argv[1], as fast as it can, until killed. Round r's tensors are
filled with r, so a reader can tell whether a checkpoint holds what its name says."""

from __future__ import annotations

import sys

import torch

from locoswarm.node.checkpoint import list_checkpoints, save_checkpoint

SPEC_HASH = b"c" * 32


def tensors_of(round_: int) -> dict[str, torch.Tensor]:
    return {"a": torch.full((512, 1024), float(round_)), "b": torch.full((4096,), float(round_))}


if __name__ == "__main__":
    root = sys.argv[1]
    round_ = max(list_checkpoints(root), default=0) + 1  # go on from the last run, as a resumed daemon does
    print("ready", flush=True)
    while True:
        save_checkpoint(root, round_, tensors_of(round_), {"round": round_}, spec_hash=SPEC_HASH, keep=2)
        round_ += 1
