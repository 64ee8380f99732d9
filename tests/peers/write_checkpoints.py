"""A real process for the checkpoint crash tests: writes checkpoints of rounds n+1, n+2 …
(n: the newest already there)
into the folder given as argv[1], as fast as it can, until killed. Round r's tensors are
filled with r, so a reader can tell whether a checkpoint holds what its name says.

With `--fork` instead of a folder it is a fork server: torch is imported once, and for each
folder read from stdin a child is forked that writes there as above and prints "ready PID";
once that child is dead (the test SIGKILLs it) the server prints "ended PID SIGNAL". A new
interpreter for every kill spent 1 s of the 1.3 s an attempt took importing torch."""

from __future__ import annotations

import os
import sys

import torch

from locoswarm.node.checkpoint import list_checkpoints, save_checkpoint

SPEC_HASH = b"c" * 32


def tensors_of(round_: int) -> dict[str, torch.Tensor]:
    return {"a": torch.full((512, 1024), float(round_)), "b": torch.full((4096,), float(round_))}


def write_forever(root: str, ready: str) -> None:
    round_ = max(list_checkpoints(root), default=0) + 1  # go on from the last run, as a resumed daemon does
    print(ready, flush=True)
    while True:
        save_checkpoint(root, round_, tensors_of(round_), {"round": round_}, spec_hash=SPEC_HASH, keep=2)
        round_ += 1


def serve_forks() -> None:
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                write_forever(line.strip(), f"ready {os.getpid()}")
            finally:
                os._exit(1)  # never back into the server's loop
        _, status = os.waitpid(pid, 0)
        print("ended", pid, os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--fork":
        serve_forks()
    else:
        write_forever(sys.argv[1], "ready")
