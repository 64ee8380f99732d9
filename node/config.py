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
from typing import TYPE_CHECKING, Any, Callable, Mapping, get_args, get_origin, get_type_hints

from locoswarm.node import checks
from locoswarm.node.checks import SettingError
from locoswarm.node.governor import IdlePolicy
from locoswarm.node.host import NetworkConfig

if TYPE_CHECKING:
    from locoswarm.node.spec import RunSpec

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
    """auto, cpu, mps, cuda or cuda:N."""
    max_rounds: int = 0
    """Stop once this process has trained this many rounds (0: run until stopped). It
    counts this process's rounds, not the swarm's: a peer restarted when the swarm is at round
    44 with max_rounds 80 stops at round 124. To stop with the swarm at a round, until_round."""
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
    baseline: str | None = None
    """The events file (--events) of a lone-peer run on the same spec, drawn on the dashboard
    beside this node's loss (`locoswarm demo` names its lone peer's); None: none."""
    eval_every: int | None = None
    """Evaluate on the held-out split every this many rounds (0: only at the end; None:
    after the first round, then within 5 % of the time, node/evaluation.py)."""
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
        """Every setting checked on its own and the multiaddrs parsed (node/checks.py), before
        anything is created: a SettingError names the first bad one."""
        for name in ("max_rounds", "until_round", "threads", "micro_batch", "checkpoint_every"):
            _at_least(name, getattr(self, name), 0)
        if self.eval_every is not None:
            _at_least("eval_every", self.eval_every, 0)
        for name in ("min_peers", "checkpoint_keep", "fanout"):
            _at_least(name, getattr(self, name), 1)
        if self.shard is not None:
            _at_least("shard", self.shard, 0)
        _within("max_gpu_memory_percent", self.max_gpu_memory_percent, 100)
        _within("state_upload_mbit", self.net.state_upload_mbit, 1e6, "(Mbit/s; 0: no limit)")
        _within("max_other_cpu_percent", self.idle.max_other_cpu_percent, 100)
        _at_least("resume_after_idle_min", self.idle.resume_after_idle_min, 0)
        try:
            self.idle.validate()
        except ValueError:  # only allowed_hours is left for it to find
            raise SettingError("allowed_hours", self.idle.allowed_hours, "must be two local hours in 0..24 that "
                               "differ, like 22-8 (empty: always)") from None
        from locoswarm.node.hardware import PRECISIONS

        if self.precision not in PRECISIONS:
            raise SettingError("precision", self.precision, f"must be one of {', '.join(PRECISIONS)}")
        checks.check_device("device", self.device)
        checks.check_state_dir("state_dir", self.state_dir)
        from locoswarm.node.portable import TRANSPORTS

        if self.net.transport not in TRANSPORTS:
            raise SettingError("transport", self.net.transport, f"must be one of {', '.join(TRANSPORTS)}")
        if not self.net.listen:
            raise SettingError("listen", [], "give at least one address to listen on")
        for maddr in self.net.listen:
            checks.check_listen("listen", maddr)
        for maddr in self.net.announce:
            checks.check_announce("announce", maddr)
        for maddr in self.net.peers:
            checks.check_peer("peers", maddr)
        if not self.record_ttl_s > 0 or not self.report_interval_s > 0 or self.eval_sequences < 1:
            raise ValueError("record_ttl_s and report_interval_s must be > 0, eval_sequences >= 1")

    def check_listen_ports(self) -> None:
        """Each listen address can be bound now, its port not held by another program, a
        go-libp2p one (another locoswarm daemon) included: node/checks.bind_problem."""
        for maddr in self.net.listen:
            checks.check_bind("listen", maddr)

    def check_against(self, spec: RunSpec) -> None:
        """The settings that must fit the run spec: the micro-batch divides the per-peer
        batch, the shard is one of the spec's shards."""
        batch = spec.batch_size
        if self.micro_batch and batch % self.micro_batch:
            fits = [d for d in range(1, batch + 1) if batch % d == 0]
            raise SettingError("micro_batch", self.micro_batch,
                               f"must divide the run's batch of {batch} sequences per peer (the spec's batch_size): "
                               f"one of {', '.join(map(str, fits[:12]))}{' …' if len(fits) > 12 else ''}, "
                               "or 0 to fit it to free memory")
        if self.shard is not None and self.shard >= spec.num_shards:
            raise SettingError("shard", self.shard, f"the run has {spec.num_shards} shards, 0..{spec.num_shards - 1};"
                                                    " or leave it unset to derive one from the peer id")


def _at_least(name: str, value: float, least: int) -> None:
    if not value >= least:  # also refuses NaN
        raise SettingError(name, value, f"must be >= {least}")


def _within(name: str, value: float, most: float, unit: str = "") -> None:
    if not 0 <= value <= most:  # also refuses NaN
        raise SettingError(name, value, f"must lie in [0, {most:,.0f}]{' ' + unit if unit else ''}")


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
    Setting(name="invite", type=str | None, default=None, to=None, flag="invite",
            help="An organiser's invite (`locoswarm run invite` prints one): the run's spec and peers to join through."),
    Setting(name="organiser", type=str | None, default=None, to=None, flag="organiser",
            help="The organiser's peer id: an invite signed by anyone else is refused."),
    _setting("state_dir", "Identity, lock, checkpoints and control file; default: the platform's data folder.",
             default_factory=default_state_dir),
    _setting("net.listen", "Multiaddrs to listen on (port 0: one the OS chooses)."),
    _setting("net.announce", "Public multiaddrs to announce instead of the listen addresses."),
    _setting("net.peers", "Multiaddrs of peers to join through; none: the spec's initial peers, else a new swarm.",
             flag="peer"),
    _setting("device", "auto, cpu, mps, cuda or cuda:N (the N-th CUDA device)."),
    _setting("max_rounds", "Leave once this process has trained this many rounds (0: run until stopped); "
                           "a restart counts anew from its first round. To leave at a round of the swarm: "
                           "--until-round."),
    _setting("until_round", "Leave once the outer state reaches this round of the swarm (0: no limit)."),
    _setting("min_peers", "Wait until this many peers (this one included) are live and training (not paused, not "
                          "joining) before training."),
    _setting("shard", "Data shard; unset: derived from the peer id."),
    _setting("threads", "Torch CPU threads of the training thread (0: torch's default)."),
    _setting("precision", "auto, bf16, fp16 or fp32 (auto: bf16 on Ampere+, fp16 on older CUDA, fp32 on CPU/MPS)."),
    _setting("micro_batch", "Sequences per forward pass, a divisor of the spec's batch (0: fit to free memory)."),
    _setting("max_gpu_memory_percent", "Take at most this % of the GPU's memory (0: no cap).",
             deprecated_flags=("max-gpu-memory",)),
    _setting("activation_checkpointing", "Recompute activations in backward (less memory, ≈1/3 more compute)."),
    _setting("compile", "torch.compile the transformer blocks (CUDA)."),
    _setting("baseline", "Events file (--events) of a lone-peer run, drawn on the dashboard beside this node's loss."),
    _setting("eval_every", "Evaluate every this many rounds (0: only at the end; unset: after the first round, "
                           "then as often as keeps evaluating under 5 % of the time)."),
    _setting("checkpoint_every", "Checkpoint every this many rounds (0: never), and when leaving."),
    _setting("checkpoint_keep", "How many checkpoints to keep.", deprecated_flags=("keep-checkpoints",)),
    _setting("fanout", "At most this many peers' deltas pulled per round."),
    _setting("net.auto_relay", "Look for a relay when behind NAT."),
    _setting("net.keep_ports", "Listen again on the last run's ports where the listen port is 0."),
    _setting("net.dht_client", "Take part in the DHT as a client only (behind NAT: others cannot dial us)."),
    _setting("net.transport", "auto, p2pd (hivemind's daemon: Linux, macOS) or libp2p (py-libp2p in this process: "
                              "any system; joins a swarm through its peers, cannot start one); auto: p2pd where "
                              "hivemind is installed."),
    _setting("net.state_upload_mbit",
             "At most this many Mbit/s for serving the swarm's state to joiners (0: no limit)."),
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
