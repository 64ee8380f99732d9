"""`locoswarm doctor`: what this machine has, whether it can join a run, how it listens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def doctor(
    run: Optional[Path] = typer.Option(None, "--run", help="Run spec to check against; the embedded default."),
    device: str = typer.Option("auto", help="auto, cuda, mps or cpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    network: bool = typer.Option(True, "--network/--no-network", help="Start p2pd on the listen addresses to see "
                                 "how peers would reach this machine, and dial the initial peers."),
) -> None:
    """Detect the device and its memory, and say whether this machine can join the run."""
    from locoswarm.node.hardware import report
    from locoswarm.node.host import probe_network
    from locoswarm.node.portable import transport_of, transport_problem
    from locoswarm.node.spec import load_spec
    from locoswarm.node.userconfig import resolve

    try:
        spec = load_spec(None if run is None else str(run))
        values, sources = resolve({})
        r = report(spec, device, memory_fraction=values["max_gpu_memory_percent"] / 100)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    r["listen"] = values["listen"]
    r["transport"] = transport_problem(values["transport"])  # why no peer can start here; None: one can
    r["transport_name"] = None if r["transport"] else transport_of(values["transport"])
    if network and r["transport"]:
        r["network"] = {"addresses": [], "verdict": "not checked: no transport to start p2pd with", "peers": []}
    elif network and r["transport_name"] == "libp2p":
        r["network"] = {"addresses": [], "verdict": "not checked: the probe starts p2pd, and this peer runs "
                                                    "py-libp2p", "peers": []}
    elif network:
        import asyncio

        from locoswarm.node.userconfig import node_config

        try:
            net = node_config(values, spec.initial_peers).net
        except ValueError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        r["network"] = asyncio.run(probe_network(net))
    else:
        r["network"] = None
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    d = r["device"]
    gib = 1 << 30
    typer.echo(f"device      {d['kind']}: {d['name']}, {d['free_bytes'] / gib:.1f} of {d['total_bytes'] / gib:.1f} GiB "
               f"free, computes in {d['precision']}")
    typer.echo(f"run         {spec.run_id} ({r['model']}, {r['params'] / 1e6:.1f}M parameters, spec "
               f"{r['spec_hash'][:16]})")
    typer.echo(f"needs       ≈{r['need_on_device_bytes'] / gib:.2f} GiB on the device"
               + (f" + {r['need_on_host_bytes'] / gib:.2f} GiB in RAM" if r["need_on_host_bytes"] else "")
               + f" at micro-batch {r['micro_batch']} of {r['batch_size']}"
               + (f" ({r['batch_size'] // r['micro_batch']} accumulated per step)"
                  if r["micro_batch"] < r["batch_size"] else ""))
    typer.echo(f"verdict     {'this machine can join' if r['fits'] else 'NOT ENOUGH MEMORY for this run'}"
               + (" once it has a transport" if r["fits"] and r["transport"] else ""))
    typer.echo("transport   " + (r["transport"] or ("hivemind " + _version("hivemind") + " (p2pd)"
                                                     if r["transport_name"] == "p2pd" else
                                                     "py-libp2p " + _version("libp2p") + " (in the daemon's "
                                                     "process)")))
    typer.echo(f"listens on  {', '.join(r['listen'])}  ({sources['listen']})")
    if r["network"] is None:
        typer.echo("reachable   not checked (--no-network)")
    else:
        n = r["network"]
        for a in n["addresses"]:
            typer.echo(f"address     {a['maddr']}  ({a['class']})")
        typer.echo(f"reachable   {n['verdict']}")
        for p in n["peers"]:
            typer.echo(f"peer        {p['peer']}: " + (f"reached in {p['ms']} ms" if p["reached"]
                                                       else f"NOT reached: {p['error']}"))
    if not r["fits"] or r["transport"]:
        raise typer.Exit(1)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"
