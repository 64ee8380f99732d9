"""`locoswarm demo`: a local swarm of real peer processes on loopback, on the embedded
default spec, printing the swarm's eval loss round by round beside that of one peer training
alone on the same tokens (a swarm of one on peer 0's shard), and both final eval losses.
Thin: bench/swarm.py."""

from __future__ import annotations

import os

import typer


def demo(
    peers: int = typer.Option(3, help="Peer processes to start on loopback."),
    rounds: int = typer.Option(30, help="Rounds every peer trains before leaving."),
    threads: int = typer.Option(0, help="Torch threads per peer (0: the CPU cores shared among the peers)."),
    keep: bool = typer.Option(False, help="Keep the peers' state directories and logs (path printed)."),
    alone: bool = typer.Option(True, help="Also train one peer alone on peer 0's tokens, to compare with."),
) -> None:
    """Start PEERS daemons on 127.0.0.1, the embedded default spec, and watch them train,
    beside one peer training alone on the same tokens."""
    import statistics
    import tempfile

    from locoswarm.bench.swarm import LocalSwarm

    from locoswarm.node.portable import transport_problem

    if peers < 1 or rounds < 1 or threads < 0:
        typer.echo("error: --peers and --rounds must be >= 1, --threads >= 0", err=True)
        raise typer.Exit(2)
    problem = transport_problem()
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    threads = threads or max(1, (os.cpu_count() or 1) // (peers + alone))
    swarm = LocalSwarm(peers, spec_path=None, max_rounds=rounds, threads=threads, eval_every=1, alone=alone,
                       keep_dir=tempfile.mkdtemp(prefix="locoswarm-demo-") if keep else None)
    typer.echo(f"starting {peers} peers on 127.0.0.1 (tiny model, bundled Shakespeare, {threads} thread(s) each)"
               + (" and one peer alone on peer 0's tokens" if alone else "") + f"; logs in {swarm.dir}"
               + ("" if keep else " (removed at the end; --keep keeps them)"))

    def on_round(r, lines) -> None:
        if r == 0:
            url = swarm.dashboard_url(swarm.peers[0])
            if url:
                typer.echo(f"dashboard of peer 0 (while it runs): {url}")
            typer.echo("round   eval loss: swarm (mean of the peers' replicas on held-out text)"
                       + (" | alone" if alone else ""))
        solo = next((x for x in swarm.alone.rounds if x.round == r), None) if alone else None
        typer.echo(f"round {r:>3}  eval loss {statistics.fmean(x.eval_loss for x in lines):.4f}"
                   + ("" if solo is None else f" | alone {solo.eval_loss:.4f}")
                   + f"  train loss {statistics.fmean(x.loss for x in lines):.4f}"
                   + f"  deltas {sum(x.deltas for x in lines)}/{sum(x.participants for x in lines)}")

    try:
        swarm.start()
        typer.echo(f"first peer: {swarm.peers[0].addr}")
        swarm.follow(on_round)
    except KeyboardInterrupt:
        typer.echo("stopping the peers")
    except (RuntimeError, TimeoutError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    finally:
        swarm.stop()
    finals = [p.final for p in swarm.peers if p.final]
    if finals:
        same = len({f["digest"] for f in finals}) == 1
        final = statistics.fmean(f["eval_loss"] for f in finals)
        typer.echo(f"done: final eval loss {final:.4f}; the peers' outer states are "
                   f"{'identical' if same else 'DIFFERENT'}")
        if swarm.alone is not None and swarm.alone.final:
            solo, tokens = swarm.alone.final["eval_loss"], sum(x.tokens for x in swarm.alone.rounds)
            gain = 100 * (1 - final / solo)
            typer.echo(f"swarm eval loss {final:.4f} vs alone {solo:.4f} "
                       f"({f'{gain:.1f} % lower' if gain >= 0 else f'{-gain:.1f} % higher'}; "
                       f"each peer trained {tokens:,} tokens)")
