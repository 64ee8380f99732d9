"""The volunteer's settings for the daemon (issue 4): built-in defaults, then a TOML file in
the platform's config directory (platformdirs; `LOCOSWARM_CONFIG` or `--config` name
another), then `LOCOSWARM_*` environment variables, then command-line flags, each
overriding the one before. Every effective value remembers where it came from, which
`locoswarm config show` prints. Parsing is strict: an unknown key or a wrong type in the
file, or an unparsable environment variable, is an error naming the key and the file or
the variable, and nothing is started.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from locoswarm.node.config import NodeConfig
from locoswarm.node.governor import IdlePolicy
from locoswarm.node.host import DEFAULT_LISTEN, NetworkConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "LOCOSWARM_"
ENV_CONFIG = "LOCOSWARM_CONFIG"


def default_config_path() -> str:
    import platformdirs

    return os.path.join(platformdirs.user_config_dir("locoswarm"), "config.toml")


def default_state_dir() -> str:
    import platformdirs

    return os.path.join(platformdirs.user_data_dir("locoswarm"), "node")


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    kind: str
    """str, int, bool, list (of strings) or int? (an int or unset)."""
    default: Any
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("run", "str?", None, "run spec (TOML); unset: the embedded default"),
    Setting("state_dir", "str", None, "identity, lock, checkpoints, control file"),
    Setting("listen", "list", list(DEFAULT_LISTEN), "multiaddrs to listen on"),
    Setting("announce", "list", [], "public multiaddrs to announce"),
    Setting("peers", "list", [], "initial peers; empty: the spec's, else start a swarm"),
    Setting("device", "str", "auto", "auto, cuda, mps or cpu"),
    Setting("max_rounds", "int", 0, "leave after this many rounds (0: never)"),
    Setting("min_peers", "int", 1, "wait for this many live peers before training"),
    Setting("shard", "int?", None, "data shard (unset: from the peer id)"),
    Setting("threads", "int", 0, "torch CPU threads (0: torch's default)"),
    Setting("precision", "str", "auto", "auto, bf16, fp16 or fp32"),
    Setting("micro_batch", "int", 0, "sequences per forward pass (0: fit to free memory)"),
    Setting("max_gpu_memory_percent", "int", 0, "cap on the GPU memory taken, % (0: no cap)"),
    Setting("activation_checkpointing", "bool", False, "recompute activations in backward (less memory)"),
    Setting("compile", "bool", False, "torch.compile the transformer blocks (CUDA)"),
    Setting("eval_every", "int", 1, "evaluate every N rounds (0: only at the end)"),
    Setting("checkpoint_every", "int", 10, "checkpoint every N rounds (0: never)"),
    Setting("checkpoint_keep", "int", 3, "checkpoints kept"),
    Setting("fanout", "int", 16, "deltas pulled per round at most"),
    Setting("auto_relay", "bool", False, "look for a relay when behind NAT"),
    Setting("pause_on_gpu_use", "bool", True, "pause while another process uses the GPU"),
    Setting("max_other_cpu_percent", "int", 0, "pause while others use more CPU than this % (0: off)"),
    Setting("pause_on_battery", "bool", True, "pause while on battery"),
    Setting("allowed_hours", "str", "", "train only in these local hours, e.g. 22-8"),
    Setting("resume_after_idle_min", "int", 0, "resume after this many idle minutes"),
)
BY_NAME = {s.name: s for s in SETTINGS}


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


def _from_file(value: Any, s: Setting, where: str) -> Any:
    ok = {
        "str": isinstance(value, str),
        "str?": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "int?": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[s.kind]
    if not ok:
        expected = {"str": "a string", "str?": "a string", "int": "an integer", "int?": "an integer",
                    "bool": "true or false", "list": "a list of strings"}[s.kind]
        raise ValueError(f"{where}: {s.name} must be {expected}, got {type(value).__name__} {value!r}")
    return list(value) if s.kind == "list" else value


def _from_env(text: str, s: Setting, var: str) -> Any:
    try:
        if s.kind in ("int", "int?"):
            return int(text)
        if s.kind == "bool":
            lowered = text.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return lowered in ("1", "true", "yes")
        if s.kind == "list":
            return [part.strip() for part in text.split(",") if part.strip()]
        return text
    except ValueError:
        raise ValueError(f"environment variable {var}={text!r}: {s.name} must be {s.kind}") from None


def resolve(flags: Mapping[str, Any], *, config_path: str | None = None,
            env: Mapping[str, str] = os.environ) -> tuple[dict[str, Any], dict[str, str]]:
    """Effective settings and, per setting, where its value came from."""
    values = {s.name: s.default for s in SETTINGS}
    values["state_dir"] = default_state_dir()
    sources = {s.name: "default" for s in SETTINGS}
    explicit = config_path or env.get(ENV_CONFIG)
    path = explicit or default_config_path()
    if explicit and not os.path.exists(path):
        raise ValueError(f"config file {path} does not exist")
    if os.path.exists(path):
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        except OSError as e:
            raise ValueError(f"config file {path}: {e.strerror}") from None
        for key, value in table.items():
            if key not in BY_NAME:
                raise ValueError(f"{path}: unknown key {key!r} (known: {', '.join(BY_NAME)})")
            values[key] = _from_file(value, BY_NAME[key], path)
            sources[key] = f"file {path}"
    for s in SETTINGS:
        var = env_name(s.name)
        if var in env:
            values[s.name] = _from_env(env[var], s, var)
            sources[s.name] = f"env {var}"
    for name, value in flags.items():
        if value is not None:
            values[name] = value
            sources[name] = f"flag --{name.replace('_', '-')}"
    return values, sources


def node_config(values: Mapping[str, Any], initial_peers: list[str]) -> NodeConfig:
    """The daemon's config from effective settings; the spec's initial peers when none given."""
    cfg = NodeConfig(
        state_dir=values["state_dir"], device=values["device"], max_rounds=values["max_rounds"],
        min_peers=values["min_peers"], shard=values["shard"], threads=values["threads"],
        precision=values["precision"], micro_batch=values["micro_batch"],
        max_gpu_memory_percent=values["max_gpu_memory_percent"],
        activation_checkpointing=values["activation_checkpointing"], compile=values["compile"],
        eval_every=values["eval_every"], fanout=values["fanout"], checkpoint_every=values["checkpoint_every"],
        checkpoint_keep=values["checkpoint_keep"],
        idle=IdlePolicy(pause_on_gpu_use=values["pause_on_gpu_use"],
                        max_other_cpu_percent=float(values["max_other_cpu_percent"]),
                        pause_on_battery=values["pause_on_battery"], allowed_hours=values["allowed_hours"],
                        resume_after_idle_min=float(values["resume_after_idle_min"])),
        net=NetworkConfig(listen=list(values["listen"]), announce=list(values["announce"]),
                          peers=list(values["peers"]) or list(initial_peers), auto_relay=values["auto_relay"]),
    )
    cfg.validate()
    return cfg
