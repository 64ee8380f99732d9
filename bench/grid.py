"""Rotating grid groups for the convergence benchmark (issue 18, item 2), after Moshpit
All-Reduce (Ryabinin et al. 2021): N = G^d peers sit on a d-dimensional grid of side G;
in round r a group is the peers that share every coordinate except dimension r mod d, so
every group has G members, every peer is in one group per round, and after d rounds
every pair of peers has been connected through a chain of groups.

Each member aggregates its group's compressed deltas and steps ITS OWN outer state. That
is not Moshpit's averaging: averaging pseudo-gradients does not average states, so the
replicas' outer states drift apart (a random walk with no restoring force). The mixing
rules here add one back, each with the bytes it would cost (see `GroupConfig.mix`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIXES = ("none", "average", "sparse", "sync")
SCHEMES = ("grid", "tree")
ROWS = ("fixed", "rotating")
ROW_ERRORS = ("group", "members", "dropped")


@dataclass(kw_only=True, slots=True)
class GroupConfig:
    group_size: int = 0
    """G: peers per exchange group; 0 is the full exchange (every peer aggregates every delta)."""
    scheme: str = "grid"
    """"grid": each member steps its own outer state with its group's aggregate (the groups
    rotate over the grid's dimensions; states drift apart, see `mix`). "tree": one consensus
    kept by d exchanges a round up the grid's dimensions: each row aggregates its G deltas
    (every member computes the same aggregate), which is compressed again with an error
    feedback of its own (held alike by every member), then G rows' aggregates are
    aggregated alike, and so on up to the whole grid: d(G − 1) messages a peer, one outer
    state (bench/groups.py run_tree; d = 2: rows, then the rows' aggregates)."""
    mix: str = "none"
    """The restoring force between the replicas' outer states, applied after the outer step of
    every `mix_every`-th round. "none": pseudo-gradients only, states drift. "average": each
    member replaces its outer state by its group's mean outer state (Moshpit's parameter
    averaging, exact; it costs each peer (G−1) fp32 states). "sparse": the same averaging on
    what each member's state moved since its group last met (groups recur every d rounds),
    compressed like a delta, the unsent part kept in the member's state (one more compressed
    message to the G−1). "sync": every replica takes the whole swarm's mean outer state (an
    fp32 ring all-reduce, 2(N−1)/N·4·P each)."""
    mix_every: int = 1
    """K: mix after every K-th round (the states' bytes are paid once per K rounds)."""
    mix_density: float = 0.0
    """The "sparse" mix's top-k density; 0: the deltas' density."""
    rows: str = "fixed"
    """The tree's groups. "fixed": consecutive replicas, the same every round. "rotating":
    drawn afresh every round from a seed of the round (a permutation of the replicas), so
    no group outlives its round: what a daemon under churn can run."""
    row_error: str = "group"
    """What a tree's group does with its recompression error. "group": an error feedback of
    its own, which all its members hold alike (state a daemon would keep per group and hand
    to joiners; fixed rows only). "members": added to the residual of every replica below
    the group, which sends it again with its next delta (no group state). "dropped": lost."""

    def validate(self, replicas: int) -> None:
        if self.group_size < 0 or self.group_size == 1:
            raise ValueError(f"group_size must be 0 (full exchange) or >= 2, got {self.group_size}")
        if self.mix not in MIXES:
            raise ValueError(f"group mix must be one of {', '.join(MIXES)}, got {self.mix!r}")
        if not 0 <= self.mix_density <= 1:
            raise ValueError(f"group mix_density must lie in [0, 1], got {self.mix_density}")
        if self.mix_density and self.mix != "sparse":
            raise ValueError(f"group mix_density applies to the sparse mix only, not {self.mix!r}")
        if self.mix_every < 1:
            raise ValueError(f"group mix_every must be >= 1, got {self.mix_every}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"group scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.rows not in ROWS:
            raise ValueError(f"group rows must be one of {', '.join(ROWS)}, got {self.rows!r}")
        if self.row_error not in ROW_ERRORS:
            raise ValueError(f"group row_error must be one of {', '.join(ROW_ERRORS)}, got {self.row_error!r}")
        if (self.rows, self.row_error) != ("fixed", "group") and self.scheme != "tree":
            what = f"rows {self.rows!r}" if self.rows != "fixed" else f"row_error {self.row_error!r}"
            raise ValueError(f"group {what} applies to the tree scheme only, not {self.scheme!r}")
        if self.rows == "rotating" and self.row_error == "group":
            raise ValueError("group row_error 'group' needs fixed rows (a rotating group lives one round)")
        if self.scheme == "tree" and self.mix != "none":
            raise ValueError(f"group mix {self.mix!r} does not apply to the tree scheme (one outer state)")
        if self.group_size == 0:
            if self.mix != "none" or self.scheme != "grid":
                what = f"mix {self.mix!r}" if self.mix != "none" else f"scheme {self.scheme!r}"
                raise ValueError(f"group {what} needs a group_size (the full exchange has one state)")
            return
        grid_dims(replicas, self.group_size)


def grid_dims(replicas: int, group_size: int) -> int:
    """d with group_size^d == replicas; ValueError naming both otherwise."""
    d, n = 0, 1
    while n < replicas:
        n *= group_size
        d += 1
    if n != replicas or d < 1:
        raise ValueError(f"group_size {group_size} needs replicas = {group_size}^d (a full grid); "
                         f"got replicas {replicas}")
    return d


def round_groups(replicas: int, group_size: int, round_: int) -> list[list[int]]:
    """The groups of round `round_`: replica i has grid coordinates c_k = ⌊i / G^k⌋ mod G;
    its group is the G replicas that differ from it in coordinate k = round_ mod d only.
    Each group is listed in ascending replica order, groups by their smallest member."""
    d = grid_dims(replicas, group_size)
    stride = group_size ** (round_ % d)
    groups = []
    for base in range(replicas):
        if (base // stride) % group_size == 0:
            groups.append([base + m * stride for m in range(group_size)])
    return groups


@torch.no_grad()
def mean_state(states: list[list[Tensor]]) -> list[Tensor]:
    """The parameter-wise mean of several outer states (summed in the order given)."""
    out = [t.clone() for t in states[0]]
    for s in states[1:]:
        for o, t in zip(out, s):
            o.add_(t)
    for o in out:
        o.div_(len(states))
    return out


@torch.no_grad()
def spread(states: list[list[Tensor]]) -> float:
    """max over pairs i ≠ j of ‖θi − θj‖ / ‖θi‖, every parameter flattened into one vector:
    0 when the replicas share one outer state."""
    worst = 0.0
    norms = [float(torch.sqrt(sum((t.double() ** 2).sum() for t in s))) for s in states]
    for i, a in enumerate(states):
        for j in range(i + 1, len(states)):
            # ‖θi − θj‖ is symmetric: the pair's larger ratio is over the smaller norm
            dist = float(torch.sqrt(sum(((x - y).double() ** 2).sum() for x, y in zip(a, states[j]))))
            worst = max(worst, dist / min(norms[i], norms[j]))
    return worst
