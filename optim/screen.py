"""Screening a round's deltas before aggregation: what one bad peer can do to a round is
bounded here.

- A delta with a non-finite value anywhere is refused (the protocol decoder already
  refuses non-finite scales; this holds for any delta handed in).
- Norms: each delta's L2 norm (of its decoded values, summed over tensors in float64) is
  compared with the round's median; rule "clip" scales a delta above norm_factor × median
  down to that norm (κ = 1 by default: Templar's rule, clip to the median; config.py says
  how it was chosen), rule "reject" leaves it out. A peer's own delta gets the same
  treatment as everyone's: exempting it makes each peer aggregate a different set of
  weights, so peers that all hold every delta still end on different outer states.
- Token claims: a delta's token count (its weight) above token_factor × the round's median
  claim is cut to it. A bound from the peer's announced throughput × the round's duration
  would not do: each peer sees those at different moments, so peers would
  weigh the same delta differently and their outer states would split. Every input here is
  in the deltas themselves, so every peer holding the same deltas decides the same.

Earned weight (optim/credit.py): when some sender of the round is established, the medians
are taken over the established senders only, every newcomer is held to them whatever the
round's size, and the newcomers together weigh as much as one established peer's median
claim. Identities cost nothing; the work that establishes one does.

Checked contributions (optim/check.py): a delta of an excluded sender (a negative ledger
entry) is refused. The failed checks a round's deltas carry (each about the round before) are
weighed by the ledger: a peer that established senders holding more than half of the round's
established weight (the checked peer's own included: two peers cannot exclude two others of
four) say failed is excluded from this round on. Without an established sender nobody is
excluded: identities would decide.

Median of an even count: the mean of the two middle values. With fewer than 3 deltas there
is no meaningful median of the round: only non-finite deltas are refused, and newcomers held
to the established peers' median.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


from locoswarm.kernels import dequantize
from locoswarm.optim.check import SCALE, threshold_milli
from locoswarm.optim.config import RobustConfig
from locoswarm.optim.credit import Ledger, Standing
from locoswarm.protocol import DecodedDelta

MIN_FOR_MEDIAN = 3


@dataclass(frozen=True, slots=True)
class Rejection:
    sender: str
    reason: str


@dataclass(slots=True)
class Screened:
    deltas: list[DecodedDelta] = field(default_factory=list)
    """Kept deltas, ascending sender order."""
    scales: dict[str, float] = field(default_factory=dict)
    """sender → multiplier of its values (1.0 unless clipped)."""
    tokens: dict[str, int] = field(default_factory=dict)
    """sender → the token count it is weighted by (its claim, or the cap)."""
    rejected: list[Rejection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What was changed but kept (clipped norms, cut claims, pooled newcomers), for the log."""
    shares: int = 0
    """Peers' worth of planned work the kept deltas stand for: one each, the round's
    newcomers one together while some sender is established (RoundStep.carry)."""
    earned: dict[str, int] = field(default_factory=dict)
    """sender → the credit its delta earns in the ledger (optim/credit.py): the tokens it is
    weighted by times its clip multiplier."""
    banned: tuple[str, ...] = ()
    """Peers the round's checks exclude from here on (optim/check.py), ascending."""


def delta_norm(d: DecodedDelta) -> float:
    """L2 norm of a delta's decoded values over all its tensors (NaN if any is not finite)."""
    total = 0.0
    for t in d.tensors:
        values = dequantize(t.codes, t.scales, t.layout, t.bits).double()
        total += float((values * values).sum())
    return math.sqrt(total) if math.isfinite(total) else math.nan


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def screen(deltas: list[DecodedDelta], cfg: RobustConfig, ledger: Ledger | None = None, base: str = "") -> Screened:
    """Apply the rules to one round's deltas (any order in; sender order out). `ledger`:
    whose weight is earned (optim/credit.py); without one, or while no sender of the round
    is established, every sender counts alike. `base`: the round chain of this peer's outer
    state ("" unknown): a delta taken from another known one is refused (a diverged peer's:
    it moves another outer state, and cannot be checked against this one)."""
    out = Screened()
    norms: dict[str, float] = {}
    for d in sorted(deltas, key=lambda d: d.sender):
        if base and d.base and d.base != base:
            out.rejected.append(Rejection(d.sender, f"taken from another outer state (round chain {d.base[:12]}…, "
                                                    f"ours {base[:12]}…): a diverged peer's, left out until it "
                                                    "takes the swarm's state"))
            continue
        if ledger is not None and ledger.banned(d.sender):
            out.rejected.append(Rejection(d.sender, f"excluded at round {ledger.banned_at(d.sender)}: "
                                                    "its delta failed the checks of the established peers"))
            continue
        n = delta_norm(d)
        if not math.isfinite(n):
            out.rejected.append(Rejection(d.sender, "non-finite values in its delta"))
            continue
        norms[d.sender] = n
        out.deltas.append(d)
    standing = ledger.standing([d.sender for d in out.deltas]) if ledger is not None else None
    if standing is not None and cfg.check_agreement > 0:
        out.banned = _judge(out, standing, ledger, threshold_milli(cfg.check_agreement))
        if out.banned:
            out.deltas = [d for d in out.deltas if d.sender not in out.banned]
            standing = ledger.standing([d.sender for d in out.deltas])
    # The references come from the established senders when there are any: newcomers,
    # however many, neither move the median nor escape it. Established deltas are held to
    # it from MIN_FOR_MEDIAN deltas on (as before earned weight); newcomers always are.
    reference = [d for d in out.deltas if standing is None or d.sender in standing.established]
    held = [d for d in out.deltas
            if len(out.deltas) >= MIN_FOR_MEDIAN or (standing is not None and d.sender in standing.newcomers)]
    of = "the established peers' median" if standing is not None else "the round's median"
    if held and cfg.norm_rule != "none":
        mid = median([norms[d.sender] for d in reference])
        limit = cfg.norm_factor * mid
        for d in held:
            n = norms[d.sender]
            if n > limit and mid > 0:
                ratio = f"norm {n:.3g} is {n / mid:.3g}× {of} {mid:.3g} (limit {cfg.norm_factor:g}×)"
                if cfg.norm_rule == "reject":
                    out.rejected.append(Rejection(d.sender, ratio))
                    continue
                out.scales[d.sender] = limit / n
                out.notes.append(f"{d.sender}: {ratio}: clipped to {limit:.3g}")
        refused = {r.sender for r in out.rejected}
        out.deltas = [d for d in out.deltas if d.sender not in refused]
        reference = [d for d in reference if d.sender not in refused]
    for d in out.deltas:
        out.scales.setdefault(d.sender, 1.0)
        out.tokens[d.sender] = d.num_tokens
    if held:
        claims = median([float(d.num_tokens) for d in reference])
        cap = max(1, int(cfg.token_factor * claims))
        for d in held:
            if d.sender in out.tokens and d.num_tokens > cap:
                out.notes.append(f"{d.sender}: claims {d.num_tokens} tokens, {d.num_tokens / claims:.3g}× "
                                 f"{of.replace('median', 'median claim')}: weighted as {cap}")
                out.tokens[d.sender] = cap
        if standing is not None:
            _pool_newcomers(out, standing, one_peer=max(1, int(claims)))
    for d in out.deltas:
        out.earned[d.sender] = int(out.tokens[d.sender] * min(1.0, out.scales[d.sender]))
    fresh = [d for d in out.deltas if standing is not None and d.sender in standing.newcomers]
    out.shares = len(out.deltas) - len(fresh) + bool(fresh)
    return out


def _judge(out: Screened, standing: Standing, ledger: Ledger, threshold: int) -> tuple[str, ...]:
    """The peers the failed checks carried by the round's established senders exclude: those
    that senders holding more than half of the round's established credit (the checked
    peer's own included) found below `threshold` (thousandths). Their deltas of this round,
    if any, are refused with the reason."""
    credit = {s: ledger.credits[s] for s in standing.established}
    total = sum(credit.values())
    against: dict[str, list[tuple[str, int]]] = {}
    for d in out.deltas:
        if d.sender not in credit:
            continue  # a newcomer's checks do not count: identities would decide
        for peer, agreement in d.checks:
            if agreement < threshold and peer != d.sender:
                against.setdefault(peer, []).append((d.sender, agreement))
    banned = []
    for peer, verdicts in sorted(against.items()):
        weight = sum(credit[v] for v, _ in verdicts)
        if 2 * weight <= total or ledger.banned(peer):
            continue
        banned.append(peer)
        agreements = ", ".join(f"{a / SCALE:.2f}" for _, a in verdicts)
        why = (f"its delta of the round before failed the checks of {len(verdicts)} established peers holding "
               f"{weight / total:.0%} of the established weight "
               f"(agreement {agreements}; threshold {threshold / SCALE:.2f}): excluded")
        if any(d.sender == peer for d in out.deltas):
            out.rejected.append(Rejection(peer, why))
        else:
            out.notes.append(f"{peer}: {why}")
    return tuple(banned)


def _pool_newcomers(out: Screened, standing: Standing, *, one_peer: int) -> None:
    """The round's newcomers share the weight of one peer (the established peers' median
    claim), in proportion to their claims: a hundred fresh identities weigh as one."""
    fresh = [d.sender for d in out.deltas if d.sender in standing.newcomers]
    total = sum(out.tokens[s] for s in fresh)
    if total <= one_peer:
        return
    for s in fresh:
        out.tokens[s] = out.tokens[s] * one_peer // total
    out.notes.append(f"{len(fresh)} newcomers ({total} tokens claimed) share one established peer's weight, "
                     f"{one_peer} tokens")


def apply_screen(screened: Screened) -> list[DecodedDelta]:
    """The kept deltas with their token counts replaced by the capped ones and their values
    scaled by the clip multipliers (codes and indices untouched: the scale pair is scaled,
    which scales every decoded value of the chunk)."""
    import dataclasses

    out = []
    for d in screened.deltas:
        k = screened.scales[d.sender]
        tensors = d.tensors if k == 1.0 else tuple(dataclasses.replace(t, scales=t.scales * k) for t in d.tensors)
        out.append(dataclasses.replace(d, num_tokens=screened.tokens[d.sender], tensors=tensors))
    return out
