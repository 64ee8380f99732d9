"""The daemon's own settings (not shared with the swarm: those are the run spec's), declared
once. `NodeConfig` is what the daemon reads; `SETTINGS` says which of its fields a volunteer
may set, each as one `Setting` whose type and default are the field's. From a `Setting`
derive its config-file key (its name), its environment variable (`LOCOSWARM_<NAME>`), its
flag of `locoswarm node join` (its name with dashes), the parsing of each and what
`locoswarm config show` prints; userconfig layers them, cli/ turns them into options.
"""

from __future__ import annotations

import copy
import os
from dataclasses import MISSING, dataclass, field, fields
from types import UnionType
from typing import Any, Callable, Mapping, get_args, get_origin, get_type_hints

from locoswarm.node.governor import IdlePolicy
from locoswarm.node.host import NetworkConfig

ENV_PREFIX = "LOCOSWARM_"


@dataclass(kw_only=True, slots=True)
class NodeConfig:
    state_dir: str
    """Identity, lock and control file live here."""
    net: NetworkConfig = field(default_factory=NetworkConfig)
    """Listen addresses, initial peers, relay."""
    idle: IdlePolicy = field(default_factory=IdlePolicy)
    """When to step aside for the machine's owner."""
    idle_check_s: float = 2.0
    """How often the machine is read for the idle policy."""
    device: str = "auto"
    """auto, cuda, cuda:N, mps or cpu."""
    max_rounds: int = 0
    """Stop after this many rounds of this process (0: run until stopped)."""
    until_round: int = 0
    """Stop once this peer's outer state reaches this round, the swarm's round count (0: no
    such limit): a peer restarted or joined late stops with the others."""
    min_peers: int = 1
    """Wait until this many peers (this one included) are live before training."""
    shard: int | None = None
    """Data shard; None: derived from the peer id."""
    threads: int = 0
    """Torch CPU threads of the training thread (0: torch's default): the cap on CPU use."""
    precision: str = "auto"
    """auto, bf16, fp16 or fp32 (hardware.choose_precision)."""
    micro_batch: int = 0
    """Sequences per forward pass, a divisor of the spec's batch (0: fit to free memory)."""
    max_gpu_memory_percent: int = 0
    """Cap on this process's share of the GPU's memory, in % (0: no cap)."""
    activation_checkpointing: bool = False
    """Recompute activations in backward instead of keeping them (less memory, more compute)."""
    compile: bool = False
    """torch.compile the transformer blocks (CUDA)."""
    eval_every: int = 1
    """Evaluate on the held-out split every this many rounds (0: only at the end)."""
    eval_sequences: int = 64
    """Held-out sequences per evaluation."""
    checkpoint_every: int = 10
    """Write a checkpoint every this many rounds (0: never), and when leaving."""
    checkpoint_keep: int = 3
    """How many checkpoints to keep."""
    fanout: int = 16
    """F: at most this many peers' deltas pulled per round."""
    record_ttl_s: float = 60.0
    """Lifetime of this peer's DHT record; the record is refreshed, and the own registry
    bucket read, every third of it (the other sampled buckets every registry.VIEW_READ_S).
    What changes every round travels over the progress streams meanwhile, and a peer that
    died is out of the view once its stream fails to open (node/outbox.py), not when its
    record expires."""
    report_interval_s: float = 0.1
    """How often round progress is told to the round's peers (a changed count at most every
    third interval, node/rounds.py) and what they told is read."""

    def validate(self) -> None:
        if self.max_rounds < 0 or self.until_round < 0:
            raise ValueError(f"max_rounds and until_round must be >= 0, got {self.max_rounds} and {self.until_round}")
        if self.min_peers < 1:
            raise ValueError(f"min_peers must be >= 1, got {self.min_peers}")
        if self.checkpoint_every < 0 or self.checkpoint_keep < 1:
            raise ValueError("checkpoint_every must be >= 0 and checkpoint_keep >= 1")
        self.idle.validate()
        if not 0 <= self.max_gpu_memory_percent <= 100:
            raise ValueError(f"max_gpu_memory_percent must be in [0, 100], got {self.max_gpu_memory_percent}")
        if self.micro_batch < 0 or self.threads < 0:
            raise ValueError("micro_batch and threads must be >= 0")
        from locoswarm.node.hardware import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.fanout < 1:
            raise ValueError(f"fanout must be >= 1, got {self.fanout}")
        if not 0 <= self.net.state_upload_mbit <= 1e6:
            raise ValueError(f"net.state_upload_mbit must lie in [0, 1e6] Mbit/s (0: no limit), "
                             f"got {self.net.state_upload_mbit}")
        if self.eval_every < 0 or self.eval_sequences < 1:
            raise ValueError("eval_every must be >= 0 and eval_sequences >= 1")
        if not self.record_ttl_s > 0 or not self.report_interval_s > 0:
            raise ValueError("record_ttl_s and report_interval_s must be > 0")


def default_state_dir() -> str:
    import platformdirs

    return os.path.join(platformdirs.user_data_dir("locoswarm"), "node")


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list of strings"}
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting a volunteer may give in the config file, the environment or a flag."""

    name: str
    """Key in the config file; the variable is LOCOSWARM_<NAME>, the flag --<name-with-dashes>."""
    type: Any
    """bool, int, float, str or list[str]; `X | None` where unset is a value of its own."""
    default: Any
    """Value when no layer sets it (ignored with default_factory)."""
    help: str
    """One line, for --help and `config show`."""
    to: str | None
    """The NodeConfig attribute it fills ("fanout", "net.peers"); None: read by the CLI itself."""
    flag: str
    """The flag's name without dashes: the setting's name, or a singular one for a repeatable list."""
    deprecated_flags: tuple[str, ...] = ()
    """Earlier spellings of the flag, still accepted (hidden) with a warning."""
    default_factory: Callable[[], Any] | None = None
    """Computes the default where it depends on the machine (the platform's folders)."""

    def __post_init__(self) -> None:
        assert self.base in _EXPECTED, f"{self.name}: no parsing for {self.type}"
        assert self.base is not list or get_args(self.type) == (str,), f"{self.name}: lists are of strings"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def base(self) -> type:
        """bool, int, float, str or list: what a set value is."""
        args = get_args(self.type) if isinstance(self.type, UnionType) else (self.type,)
        (kind,) = [a for a in args if a is not type(None)]
        return get_origin(kind) or kind

    def default_value(self) -> Any:
        return self.default_factory() if self.default_factory else copy.copy(self.default)

    def from_toml(self, value: Any, where: str) -> Any:
        """`value` as read from a TOML file at `where`; a wrong type is a ValueError naming both."""
        base = self.base
        if base is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
        if base is list:
            ok = ok and all(isinstance(v, str) for v in value)
        if not ok:
            raise ValueError(f"{where}: {self.name} must be {_EXPECTED[base]}, got {type(value).__name__} {value!r}")
        return float(value) if base is float else list(value) if base is list else value

    def from_env(self, text: str) -> Any:
        """The value of this setting's environment variable; lists are comma-separated."""
        base = self.base
        try:
            if base is bool:
                lowered = text.strip().lower()
                if lowered not in _TRUE + _FALSE:
                    raise ValueError(text)
                return lowered in _TRUE
            if base is list:
                return [part.strip() for part in text.split(",") if part.strip()]
            return base(text)
        except ValueError:
            expected = "1/0, true/false or yes/no" if base is bool else _EXPECTED[base]
            raise ValueError(f"environment variable {self.env}={text!r}: {self.name} must be {expected}") from None


def _setting(to: str, help: str, *, flag: str | None = None, deprecated_flags: tuple[str, ...] = (),
             default_factory: Callable[[], Any] | None = None) -> Setting:
    """The setting that exposes NodeConfig's field `to` under the field's own name, with its
    type and default."""
    head, _, attr = to.rpartition(".")
    owner = get_type_hints(NodeConfig)[head] if head else NodeConfig
    declared = next(f for f in fields(owner) if f.name == attr)
    if declared.default is not MISSING:
        default = declared.default
    elif declared.default_factory is not MISSING:
        default = declared.default_factory()
    else:
        assert default_factory is not None, f"{to} has no default: the setting needs a default_factory"
        default = None
    return Setting(name=attr, type=get_type_hints(owner)[attr], default=default, help=help, to=to,
                   flag=flag or attr.replace("_", "-"), deprecated_flags=deprecated_flags,
                   default_factory=default_factory)


SETTINGS: tuple[Setting, ...] = (
    Setting(name="run", type=str | None, default=None, help="Run spec (TOML); unset: the embedded default.",
            to=None, flag="run"),
    _setting("state_dir", "Identity, lock, checkpoints and control file; default: the platform's data folder.",
             default_factory=default_state_dir),
    _setting("net.listen", "Multiaddrs to listen on (port 0: one the OS chooses)."),
    _setting("net.announce", "Public multiaddrs to announce instead of the listen addresses."),
    _setting("net.peers", "Multiaddrs of peers to join through; none: the spec's initial peers, else a new swarm.",
             flag="peer"),
    _setting("device", "auto, cuda, cuda:N (one of several GPUs), mps or cpu."),
    _setting("max_rounds", "Leave after this many rounds of this process (0: run until stopped)."),
    _setting("until_round", "Leave once the outer state reaches this round of the swarm (0: no limit)."),
    _setting("min_peers", "Wait until this many peers (this one included) are live and training (not paused, not joining) before training."),
    _setting("shard", "Data shard; unset: derived from the peer id."),
    _setting("threads", "Torch CPU threads of the training thread (0: torch's default)."),
    _setting("precision", "auto, bf16, fp16 or fp32 (auto: bf16 on Ampere+, fp16 on older CUDA, fp32 on CPU/MPS)."),
    _setting("micro_batch", "Sequences per forward pass, a divisor of the spec's batch (0: fit to free memory)."),
    _setting("max_gpu_memory_percent", "Take at most this % of the GPU's memory (0: no cap).",
             deprecated_flags=("max-gpu-memory",)),
    _setting("activation_checkpointing", "Recompute activations in backward (less memory, ≈1/3 more compute)."),
    _setting("compile", "torch.compile the transformer blocks (CUDA)."),
    _setting("eval_every", "Evaluate every this many rounds (0: only at the end)."),
    _setting("checkpoint_every", "Checkpoint every this many rounds (0: never), and when leaving."),
    _setting("checkpoint_keep", "How many checkpoints to keep.", deprecated_flags=("keep-checkpoints",)),
    _setting("fanout", "At most this many peers' deltas pulled per round."),
    _setting("net.auto_relay", "Look for a relay when behind NAT."),
    _setting("net.keep_ports", "Listen again on the last run's ports where the listen port is 0."),
    _setting("net.dht_client", "Take part in the DHT as a client only (behind NAT: others cannot dial us)."),
    _setting("net.state_upload_mbit", "At most this many Mbit/s for serving the swarm's state to joiners (0: no limit)."),
    _setting("idle.pause_on_gpu_use", "Pause while another process uses the GPU (a game)."),
    _setting("idle.max_other_cpu_percent", "Pause while other processes use more than this % of all CPUs (0: off).",
             deprecated_flags=("max-other-cpu",)),
    _setting("idle.pause_on_battery", "Pause while on battery."),
    _setting("idle.allowed_hours", "Train only in these local hours, e.g. 22-8 (empty: always)."),
    _setting("idle.resume_after_idle_min", "After a pause, resume once the machine has been idle this many minutes."),
)
BY_NAME = {s.name: s for s in SETTINGS}

# NodeConfig's fields that no volunteer sets, on purpose; a new field must be added to
# SETTINGS or here (a test checks), so that exposing it is a decision.
NOT_SETTINGS = {
    "eval_sequences": "peers' eval losses are compared with each other: all evaluate the same sequences",
    "record_ttl_s": "the swarm's timing: every peer assumes the others' records live this long",
    "report_interval_s": "the swarm's timing: how often every peer writes and reads round progress",
    "idle_check_s": "how often the governor samples the machine: nothing for a volunteer to weigh",
    "net.retry_max_s": "backoff towards the initial peers: nothing for a volunteer to weigh",
}


def config_from_settings(values: Mapping[str, Any]) -> NodeConfig:
    """The NodeConfig that `values` (every setting's value, by name) describe; fields in
    NOT_SETTINGS keep their defaults. Not validated."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for s in SETTINGS:
        if s.to is not None:
            head, _, attr = s.to.partition(".")
            value = copy.copy(values[s.name])  # the config owns its lists
            if attr:
                nested.setdefault(head, {})[attr] = value
            else:
                top[head] = value
    hints = get_type_hints(NodeConfig)
    return NodeConfig(**top, **{head: hints[head](**kwargs) for head, kwargs in nested.items()})
