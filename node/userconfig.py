"""Where the volunteer's settings come from: each setting's declared default, then a TOML
file in the platform's config directory (platformdirs; `LOCOSWARM_CONFIG` or `--config`
name another), then `LOCOSWARM_*` environment variables, then command-line flags, each
overriding the one before. Every effective value remembers where it came from, which
`locoswarm config show` prints. Parsing is strict: an unknown key or a wrong type in the
file, or an unparsable environment variable, is an error naming the key and the file or
the variable, and nothing is started. The settings themselves are declared in node/config.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Mapping

from locoswarm.node.checks import SettingError, shown
from locoswarm.node.config import BY_NAME, ENV_PREFIX, SETTINGS, NodeConfig, config_from_settings
from locoswarm.node.files import read_toml

if TYPE_CHECKING:
    from locoswarm.node.spec import RunSpec

__all__ = ["ENV_CONFIG", "SETTINGS", "config_file", "default_config_path", "describe", "env_name", "join_config",
           "node_config", "resolve"]

ENV_CONFIG = ENV_PREFIX + "CONFIG"
assert ENV_CONFIG not in {s.env for s in SETTINGS}


def default_config_path() -> str:
    import platformdirs

    return os.path.join(platformdirs.user_config_dir("locoswarm"), "config.toml")


def config_file(config_path: str | None = None, env: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """The config file that is read, and whether it was named (then it must exist)."""
    named = config_path or env.get(ENV_CONFIG)
    return named or default_config_path(), bool(named)


def env_name(setting: str) -> str:
    """The environment variable of the setting named `setting`."""
    return BY_NAME[setting].env


def resolve(flags: Mapping[str, Any], *, config_path: str | None = None,
            env: Mapping[str, str] = os.environ) -> tuple[dict[str, Any], dict[str, str]]:
    """Effective settings and, per setting, where its value came from. `flags` maps setting
    names to what the command line gave (None: not given)."""
    values = {s.name: s.default_value() for s in SETTINGS}
    sources = {s.name: "default" for s in SETTINGS}
    path, named = config_file(config_path, env)
    if named or os.path.exists(path):
        for key, value in read_toml(path, "config file").items():
            if key not in BY_NAME:
                raise ValueError(f"{path}: unknown key {key!r} (known: {', '.join(BY_NAME)})")
            values[key] = BY_NAME[key].from_toml(value, path)
            sources[key] = f"file {path}"
    for s in SETTINGS:
        if s.env in env:
            values[s.name] = s.from_env(env[s.env])
            sources[s.name] = f"env {s.env}"
    for name, value in flags.items():
        if value is not None:
            values[name] = value
            sources[name] = f"flag --{BY_NAME[name].flag}"
    return values, sources


def node_config(values: Mapping[str, Any], initial_peers: list[str]) -> NodeConfig:
    """The daemon's validated config from effective settings; the spec's initial peers when
    none are given. A bad value is a SettingError (see describe)."""
    cfg = config_from_settings({**values, "peers": list(values["peers"]) or list(initial_peers)})
    cfg.validate()
    return cfg


def join_config(values: Mapping[str, Any], sources: Mapping[str, str], spec: RunSpec) -> NodeConfig:
    """The config `node join` runs the daemon with, every check made that can be made before
    anything starts (node/checks.py: the multiaddrs, the listen ports) and the settings that
    must fit `spec` checked against it; a bad value is a ValueError of one line naming where
    it was set and the value (describe)."""
    try:
        cfg = node_config(values, spec.initial_peers)
        cfg.check_against(spec)
        cfg.check_listen_ports()
    except SettingError as e:
        if e.setting == "peers" and not values["peers"]:
            # The embedded spec has none: they came from a spec file, an invite, or the
            # spec a state directory kept from its invite (node/invite.py).
            where = values["run"] or ("the invite's run spec" if values.get("invite") else
                                      "the run spec kept in the state directory")
            raise ValueError(f"{where}: initial_peers {shown(e.value)}: {e.problem}") from None
        raise ValueError(describe(e, sources)) from None
    return cfg


def describe(error: SettingError, sources: Mapping[str, str]) -> str:
    """`error` as the user set the value: `--micro-batch 3: …` for a flag,
    `LOCOSWARM_MICRO_BATCH=3: …` for the environment, `FILE: micro_batch = 3: …` for the
    config file (`resolve`'s sources say which)."""
    s = BY_NAME[error.setting]
    source = sources.get(s.name, "default")
    if source.startswith("flag "):
        where = f"--{s.flag} {shown(error.value)}"
    elif source.startswith("env "):
        where = f"{s.env}={shown(error.value)}"
    elif source.startswith("file "):
        where = f"{source.removeprefix('file ')}: {s.name} = {json.dumps(error.value)}"
    else:
        where = f"{s.name} {shown(error.value)} (the default)"
    return f"{where}: {error.problem}"
