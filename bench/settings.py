"""Apply command-line overrides to a benchmark preset, each checked by the config's own
validation (a bad value is a ValueError naming the field)."""

from __future__ import annotations

from dataclasses import replace

from locoswarm.bench.convergence import BenchConfig


def apply_overrides(base: BenchConfig, **overrides: object) -> BenchConfig:
    o = {k: v for k, v in overrides.items() if v is not None}
    dl = base.diloco
    comp = dl.compression
    comp_fields = {k: o.pop(k) for k in ("density", "bits", "chunk", "ef_decay", "residual") if k in o}
    if comp_fields:
        if comp is None:
            raise ValueError("compression settings given but the preset has compression off")
        comp = replace(comp, **comp_fields)
    group_fields = {k: o.pop(k) for k in ("group_size", "scheme", "mix", "mix_every", "mix_density", "rows",
                                                  "row_error") if k in o}
    if group_fields:
        o["groups"] = replace(base.groups, **group_fields)
    if "data" in o:
        o["data"] = replace(base.data, source=o.pop("data"))
    outer = dl.outer
    if "outer_lr" in o:
        outer = replace(outer, lr=o.pop("outer_lr"))
    if "outer_momentum" in o:
        outer = replace(outer, momentum=o.pop("outer_momentum"))
    dl = replace(dl, compression=comp, outer=outer, inner_steps=o.pop("inner_steps", dl.inner_steps))
    cfg = replace(base, diloco=dl, **o)
    cfg.validate()
    return cfg
