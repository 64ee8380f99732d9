"""`locoswarm node …`: run the volunteer daemon and ask it how it is doing. Thin: the
daemon is locoswarm.node.daemon; its settings are declared in locoswarm.node.config, which
join's flags are generated from, and resolve through locoswarm.node.userconfig (defaults <
config file < LOCOSWARM_* environment < these flags)."""

from __future__ import annotations

import inspect
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

# The declarations only (no torch): --help builds every option from them.
from locoswarm.node.config import BY_NAME, SETTINGS, Setting

F = TypeVar("F", bound=Callable[..., Any])
STOPPED_EARLY = threading.Event()
"""Set by a SIGINT or SIGTERM that came before the daemon's loop handles them (cli/main.py)."""

app = typer.Typer(help="The volunteer daemon: join a swarm, ask it for its status.", no_args_is_help=True)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for log collectors (journald, Docker, Loki)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time: above the round bar while it is drawn
    (rich redirects sys.stderr then), not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


CONFIG_HELP = "Config file (TOML); default: the platform's config dir, or $LOCOSWARM_CONFIG."


def setting_options(*names: str) -> Callable[[F], F]:
    """Gives the decorated command, which takes `**settings`, one option per setting named
    (every setting when none is): typer reads the command's signature, so the options are
    written into it from the declarations in node/config. Each option is the setting's
    flag (--x/--no-x for a bool) with its help and default; earlier spellings of a flag
    are hidden options of their own. Every option defaults to None, "not given", so that
    the config file and the environment show through; the help states the real default."""
    chosen = [BY_NAME[name] for name in names] if names else list(SETTINGS)

    def decorate(command: F) -> F:
        own = inspect.signature(command).parameters.values()
        generated = []
        for s in chosen:
            generated.append(_parameter(s.name, s, s.flag, hidden=False))
            generated += [_parameter(_deprecated(old), s, old, hidden=True) for old in s.deprecated_flags]
        command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            generated + [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD])
        return command

    return decorate


def _parameter(name: str, s: Setting, flag: str, *, hidden: bool) -> inspect.Parameter:
    repeatable = s.base is list
    help = s.help + (" Repeatable." if repeatable else "")
    if s.default_factory is None and s.default not in (None, "", []):
        shown = ("on" if s.default else "off") if s.base is bool else \
            " ".join(s.default) if repeatable else s.default
        help += f" Default: {shown}."
    option = typer.Option(None, f"--{flag}/--no-{flag}" if s.base is bool else f"--{flag}", help=help,
                          hidden=hidden)
    annotation = Optional[list[str]] if repeatable else Optional[s.base]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _deprecated(flag: str) -> str:
    return "deprecated_" + flag.replace("-", "_")


def given_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The settings the command line set, by name (a repeatable flag not given arrives as
    an empty list); a value given with an earlier spelling of a flag counts, with a
    one-line warning, unless the flag itself was also given."""
    flags = {name: value for name, value in options.items() if name in BY_NAME and value not in (None, [], ())}
    for s in SETTINGS:
        for old in s.deprecated_flags:
            value = options.get(_deprecated(old))
            if value is not None:
                typer.echo(f"warning: --{old} is deprecated; use --{s.flag}", err=True)
                flags.setdefault(s.name, value)
    return flags


@app.command()
@setting_options()
def join(
    *,
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
    log_format: str = typer.Option("text", "--log-format", help="text (readable lines) or json (one object a line)."),
    events: Optional[Path] = typer.Option(None, "--events", help="Also write the daemon's events (rounds, syncs, the "
                                          "final state) to this file, one JSON object a line, for programs."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging."),
    **settings: Any,
) -> None:
    """Join a swarm (or start one) and train until stopped: Ctrl-C or SIGTERM leaves cleanly."""
    if log_format not in ("text", "json"):
        typer.echo(f"error: --log-format must be text or json, got {log_format!r}", err=True)
        raise typer.Exit(2)
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.DEBUG)
    from locoswarm.node.portable import transport_problem

    try:
        values, spec, invite, cfg = prepare_join(given_settings(settings), config)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    from locoswarm.node.network import lp2p_cannot_start

    problem = transport_problem(cfg.net.transport) or lp2p_cannot_start(cfg)
    if problem:  # before the state directory or anything else is made
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    from locoswarm.node.daemon import run_daemon

    if invite is not None:
        pinned = "" if values["organiser"] else " (pass --organiser with the id the organiser published to pin it)"
        typer.echo(f"invite of {invite.organiser}{pinned}: run {spec.run_id!r}, spec {spec.hash().hex()[:16]}, "
                   f"joining through {len(spec.initial_peers)} peer(s)", err=True)
    raise typer.Exit(run_daemon(spec, cfg, emit=lambda line: typer.echo(line),
                                events_path=None if events is None else str(events), keep_spec=invite is not None,
                                stopped=STOPPED_EARLY))


def prepare_join(flags: dict[str, Any], config: Optional[Path]):
    """What `node join` runs with: (settings, run spec, the invite it came from or None,
    NodeConfig). Every setting is checked here, before the daemon makes its state directory
    or starts p2pd: a bad value is a ValueError of one line naming where it was set
    (node/checks.py). `config check` runs the same."""
    from locoswarm.node.checks import SettingError
    from locoswarm.node.hardware import choose_precision, pick_device
    from locoswarm.node.invite import spec_to_join
    from locoswarm.node.portable import TRANSPORTS, keep_hivemind_out, transport_of
    from locoswarm.node.userconfig import describe, join_config, resolve

    values, sources = resolve(flags, config_path=None if config is None else str(config))
    if values["transport"] in TRANSPORTS and transport_of(values["transport"]) == "libp2p":
        keep_hivemind_out()  # before any check could import hivemind (a bad value is named by the checks)
    spec, invite = spec_to_join(run=values["run"], invite=values["invite"], organiser=values["organiser"],
                                state_dir=values["state_dir"])
    cfg = join_config(values, sources, spec)
    try:
        choose_precision(pick_device(cfg.device), cfg.precision)
    except SettingError as e:
        raise ValueError(describe(e, sources)) from None
    return values, spec, invite, cfg


@app.command()
@setting_options("state_dir")
def status(
    *,
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON (see --schema)."),
    schema: bool = typer.Option(False, "--schema", help="Print the status JSON's schema (JSON Schema) and exit."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
    **settings: Any,
) -> None:
    """Ask the running daemon for its state, round, loss, peers and traffic."""
    if schema:
        from locoswarm.node.control import STATUS_SCHEMA

        typer.echo(json.dumps(STATUS_SCHEMA, indent=2))
        return
    from locoswarm.node.control import read_status
    from locoswarm.node.userconfig import resolve

    try:
        values, _ = resolve(given_settings(settings), config_path=None if config is None else str(config))
        st = read_status(values["state_dir"])
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except RuntimeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    for line in status_lines(st, time.time()):
        typer.echo(line)


def status_lines(st: dict, now: float) -> list[str]:
    """The status as a person reads it: what the JSON says that matters to the volunteer
    (why nothing trains, what failed), a line each; nothing is shown only with --json but
    the raw counters of the traffic's internals."""
    def clock(t: float) -> str:
        return f"{time.strftime('%H:%M:%S', time.localtime(t))} ({_ago(now - t)} ago)"

    def figure(x: float | None) -> str:
        return "—" if x is None else f"{x:.4f}"

    lines = [f"{st['state']}: round {st['round']}, loss {figure(st['loss'])}, eval loss {figure(st['eval_loss'])}, "
             f"{st['num_peers']} other peers (swarm ≈{st['peers_estimate']:.0f}), sent {st['bytes_sent']:,} B, "
             f"received {st['bytes_received']:,} B, {st['tokens_per_s']:.0f} tokens/s"]
    if st["dialling_since"] is not None:
        lines.append(f"dialling the initial peers since {clock(st['dialling_since'])}, "
                     f"{st['dial_attempts']} {'attempt' if st['dial_attempts'] == 1 else 'attempts'}")
    if st["paused"] is not None:
        lines.append(f"paused: {st['paused']}")
    rounds = f"rounds: {st['rounds_completed']} completed, {st['rounds_discarded']} discarded"
    lines.append(rounds + (f", the last ended {clock(st['last_round_at'])}" if st["last_round_at"] is not None
                           else ", none ended yet"))
    if st["checkpoint_error"] is not None:
        lines.append(f"checkpoint error: {st['checkpoint_error']}"
                     + (f" (the last written is of round {st['checkpoint_round']})"
                        if st["checkpoint_round"] is not None else " (none written yet)"))
    else:
        lines.append("checkpoint: " + ("none yet" if st["checkpoint_round"] is None
                                       else f"round {st['checkpoint_round']}"))
    agreement = "" if st["least_agreement"] is None else f", least agreement {st['least_agreement']:.2f}"
    lines.append(f"trust: {st['checks']} checks of others' deltas ({st['checks_failed']} failed{agreement}), "
                 f"{st['excluded_peers']} peers excluded, {st['established_peers']} established, "
                 f"{st['earned_rounds']:.1f} rounds earned; {st['deltas_rejected']} deltas rejected, "
                 f"{st['requests_refused']} requests refused")
    lines += [f"warning: {w}" for w in st["warnings"]]
    device = "no trainer yet" if st["device"] is None else \
        f"on {st['device']} in {st['precision']}, micro-batch {st['micro_batch']}, shard {st['shard']}"
    transport = {"p2pd": "on p2pd", "libp2p": "on py-libp2p"}.get(st.get("transport"), "")
    lines.append(f"peer {st['peer_id'] or '— (not listening yet)'} {device}" + (f", {transport}" if transport else ""))
    lines += [f"listening {a}" for a in st["addrs"]]
    return lines


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
