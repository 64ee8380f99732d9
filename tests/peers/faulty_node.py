"""A real daemon with a fault injector passed in (node/roundcontext.py RoundFaults): the
production command, `locoswarm node join`, run in this process with its daemon given the
faults named on the command line. Production code reads no test settings; this script is
how the tests hand the faults in.

usage: python faulty_node.py FAULT [FAULT ...] -- node join JOIN-ARGS...

FAULT:
  drop=R:I     in round R, leave out the delta of the I-th (0-based, by peer id) of the other
               peers this one expects, as if its request had timed out
  nan=R        make round R's pseudo-gradient non-finite (a diverged replica)
  report=R     fail while reporting round R done (a DHT that errors)
  negate=R     from round R on, send the negated pseudo-gradient (a peer that earned its weight
               honestly, then turns: the norm is an honest one's, so no clip bounds it)
"""

from __future__ import annotations

import functools
import math
import sys

from locoswarm.node import daemon
from locoswarm.node.roundcontext import RoundFaults


class Faults(RoundFaults):
    def __init__(self, specs: list[str]) -> None:
        self.drop: tuple[int, int] | None = None
        self.nan: set[int] = set()
        self.report: set[int] = set()
        self.negate: int | None = None
        for spec in specs:
            kind, _, value = spec.partition("=")
            if kind == "drop":
                round_, _, index = value.partition(":")
                self.drop = (int(round_), int(index))
            elif kind == "nan":
                self.nan.add(int(value))
            elif kind == "report":
                self.report.add(int(value))
            elif kind == "negate":
                self.negate = int(value)
            else:
                raise SystemExit(f"unknown fault {spec!r}")

    def trained(self, round_, work, outer) -> None:
        if round_ in self.nan:
            work.snapshot[0].view(-1)[0] = math.nan
        if self.negate is not None and round_ >= self.negate:
            for s, o in zip(work.snapshot, outer):  # θ' = 2·θ_outer − θ: the pseudo-gradient negated
                s.mul_(-1).add_(o.to(s.device), alpha=2)

    def reporting(self, round_) -> None:
        if round_ in self.report:
            raise ConnectionError(f"injected: telling the peers round {round_} is done failed")

    def keep_delta(self, round_, sender, others) -> bool:
        if self.drop is None or self.drop[0] != round_:
            return True
        index = self.drop[1]
        return not (index < len(others) and others[index] == sender)


def main() -> None:
    split = sys.argv.index("--")
    faults = Faults(sys.argv[1:split])
    daemon.run_daemon = functools.partial(daemon.run_daemon, faults=faults)
    from locoswarm.cli.main import main as cli

    sys.argv = ["locoswarm", *sys.argv[split + 1:]]
    cli()


if __name__ == "__main__":
    main()
