"""The run spec: everything peers of one training run must agree on.

A TOML file (`locoswarm run init` writes one) with the run id, genesis seed, model,
tokenizer, data, DiLoCo and compression settings, round policy and initial peers. Its hash
(SHA-256 of a canonical JSON of every setting but the initial peers, which only say where
to find the swarm, and where a peer keeps its outer state) goes into every peer record and every delta, so a peer of another run
or another spec is refused. The embedded default (tiny model on the bundled Shakespeare)
needs no file. Parsing is strict: an unknown key or a value of the wrong type is an error
that names the key and the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from locoswarm.node.files import read_toml, write_atomic
from locoswarm.workload.data import DataConfig
from locoswarm.workload.model import check_model_name
from locoswarm.workload.tokenizer import check_tokenizer_name
from locoswarm.optim import CompressionConfig, DiLoCoConfig, InnerConfig, OuterConfig
from locoswarm.optim.config import RobustConfig
from locoswarm.protocol.rows import MAX_ROW_MEMBERS
from locoswarm.protocol.work import MAX_WORK_BITS, meets

SPEC_VERSION = 1


@dataclass(kw_only=True, slots=True)
class RoundPolicy:
    deadline_s: float = 30.0
    """How long a peer waits for the round's announced deltas before aggregating what arrived."""
    overlap: bool = True
    """Train round r + 1 while round r's deltas are exchanged; the restart to the new outer
    parameters is applied as a shift when it arrives. Chosen in `bench swarm`: the same eval
    loss as synchronous rounds within run-to-run noise, 99 % of the time training instead of 72 %."""
    exchange: str = "full"
    """"full": every peer pulls every participant's delta (at most the node's fanout).
    "tree": rows of about `row_size` peers drawn each round aggregate their deltas, then every
    peer takes the rows' aggregates: one consensus at about 2·√N messages a peer
    (node/tree.py; needs diloco.robust.earn_rounds, which counts the rows)."""
    row_size: int = 16
    """Peers a tree round's row holds on average (the rows are the established peers over it)."""

    def validate(self) -> None:
        if not self.deadline_s > 0:
            raise ValueError(f"rounds.deadline_s must be > 0, got {self.deadline_s}")
        if self.exchange not in ("full", "tree"):
            raise ValueError(f"rounds.exchange must be 'full' or 'tree', got {self.exchange!r}")
        if not 2 <= self.row_size <= MAX_ROW_MEMBERS:
            raise ValueError(f"rounds.row_size must lie in [2, {MAX_ROW_MEMBERS}], got {self.row_size}")


@dataclass(kw_only=True, slots=True)
class AccessPolicy:
    """Who may take part (empty: anyone with the spec). With `allow_peers`, only those peer
    ids; with `secret`, only peers whose record proves they hold it (HMAC-SHA256 of the
    spec hash and their peer id under the secret; records are signed with the peer's
    identity, so a proof cannot be lifted into another peer's record). Everyone else's
    records are refused and their requests for deltas and state closed unanswered, their
    round progress ignored. A spec with a secret must be kept private; use a long random
    one (`python -c "import secrets; print(secrets.token_hex(32))"`)."""

    allow_peers: list[str] = field(default_factory=list)
    """base58 peer ids admitted (empty: no list)."""
    secret: str = ""
    """Shared secret (empty: none); at least 16 characters."""
    work_bits: int = 0
    """Proof of work each identity must show for this run (protocol/work.py): about 2^bits
    scrypt evaluations of ≈2 ms on one core, paid once per identity (0: none; at most 32)."""

    def validate(self) -> None:
        for p in self.allow_peers:
            if not 1 <= len(p) <= 128 or not p.isalnum():
                raise ValueError(f"access.allow_peers: {p!r} is not a base58 peer id")
        if self.secret and len(self.secret) < 16:
            raise ValueError("access.secret must be at least 16 characters (or empty for none)")
        if type(self.work_bits) is not int or not 0 <= self.work_bits <= MAX_WORK_BITS:
            raise ValueError(f"access.work_bits must be an integer in [0, {MAX_WORK_BITS}], got {self.work_bits!r}")

    @property
    def restricted(self) -> bool:
        """Peers are admitted one by one (their records checked), not everyone with the spec."""
        return bool(self.allow_peers or self.secret or self.work_bits)

    def proof(self, spec_hash: bytes, peer_id: str) -> bytes:
        """What a peer's record carries to show it holds the secret (empty without one)."""
        if not self.secret:
            return b""
        return hmac.new(self.secret.encode(), b"locoswarm-access/1" + spec_hash + peer_id.encode(),
                        hashlib.sha256).digest()

    def refuse(self, spec_hash: bytes, peer_id: str, proof: bytes, work: int = 0,
               check_work: Callable[[str, int], bool] | None = None) -> str | None:
        """Why `peer_id` is not admitted to the run (None: it is). `check_work(peer_id,
        nonce)`: a cached protocol/work.py check (None: check afresh)."""
        if self.allow_peers and peer_id not in self.allow_peers:
            return f"peer {peer_id} is not on the run's allow-list"
        if self.secret and not hmac.compare_digest(proof, self.proof(spec_hash, peer_id)):
            return f"peer {peer_id} does not prove it holds the run's secret"
        if self.work_bits:
            ok = check_work(peer_id, work) if check_work is not None else meets(spec_hash, peer_id, work, self.work_bits)
            if not ok:
                return f"peer {peer_id} shows no proof of {self.work_bits} bits of work for this run (nonce {work})"
        return None


MAX_ANCHORS = 8
"""Trust anchors a spec may name: each is in every genesis ledger (optim/credit.py), and each
signs a roll into one DHT value (node/roll.py: at most 8 × ≈9.5 kB, under the 100 kB a DHT
value may hold here)."""


@dataclass(kw_only=True, slots=True)
class TrustPolicy:
    """Whose outer state a peer takes while it knows no earned weight (a joiner; docs/trust.md)."""

    anchors: list[str] = field(default_factory=list)
    """base58 peer ids of the run's organiser peers. They are established from the run's
    first round (the genesis ledger credits them as peers that always worked: optim/credit.py
    Ledger.founded), so identities present from the start are newcomers beside them. A peer
    whose ledger knows nobody takes only a state whose manifest one of them served it (any
    donor may then serve the chunks, checked against that manifest), and waits while none is
    live. Empty: the peers it joined through vouch instead, and where none of them serves, the
    state most donors agree on."""

    def validate(self) -> None:
        if len(self.anchors) > MAX_ANCHORS:
            raise ValueError(f"trust.anchors: {len(self.anchors)} peers, at most {MAX_ANCHORS}")
        for p in self.anchors:
            if not 1 <= len(p) <= 128 or not p.isalnum():
                raise ValueError(f"trust.anchors: {p!r} is not a base58 peer id")
        if len(set(self.anchors)) != len(self.anchors):
            raise ValueError("trust.anchors: a peer id is named twice")


@dataclass(kw_only=True, slots=True)
class RunSpec:
    run_id: str = "locoswarm-default"
    """Name of the run; peers of other runs are refused."""
    seed: int = 0
    """Genesis seed: initial weights and the data shuffle."""
    model: str = "tiny"
    """Model size (tiny, small, base) or hf:llama."""
    tokenizer: str = "byte"
    """gpt2 or byte."""
    batch_size: int = 8
    """Sequences per peer per inner step."""
    total_steps: int = 100_000
    """Global steps the learning-rate schedule is planned for."""
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=64))
    """Corpus, sequence length, split."""
    num_shards: int = 16
    """Training data is cut into this many disjoint shards; a peer trains on one of them."""
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    """Inner/outer optimizers, H and compression."""
    rounds: RoundPolicy = field(default_factory=RoundPolicy)
    """Round timing."""
    access: AccessPolicy = field(default_factory=AccessPolicy)
    """Private runs: an allow-list of peer ids and/or a shared secret."""
    trust: TrustPolicy = field(default_factory=TrustPolicy)
    """The organiser peers whose state a joiner takes."""
    initial_peers: list[str] = field(default_factory=list)
    """Multiaddrs of peers to join through; not part of the hash."""

    def validate(self) -> None:
        if not self.run_id or len(self.run_id) > 128 or not self.run_id.isprintable():
            raise ValueError(f"run_id must be 1..128 printable characters, got {self.run_id!r}")
        check_tokenizer_name(self.tokenizer)
        check_model_name(self.model)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 1 <= self.num_shards <= 1 << 16:
            raise ValueError(f"num_shards must lie in [1, 65536], got {self.num_shards}")
        self.data.validate()
        self.diloco.validate()
        self.rounds.validate()
        if self.rounds.exchange == "tree" and not self.diloco.robust.earn_rounds:
            raise ValueError("rounds.exchange = 'tree' needs diloco.robust.earn_rounds > 0: a tree round's rows "
                             "are counted from the outer state's established peers")
        self.access.validate()
        self.trust.validate()

    def hash(self) -> bytes:
        """SHA-256 over every setting but `initial_peers` and `diloco.outer.device` (where a
        peer keeps its outer state is its own choice), in a canonical form."""
        body = to_dict(self)
        body.pop("initial_peers")
        body["diloco"]["outer"].pop("device")
        if not self.access.restricted:
            body.pop("access")  # open runs hash as they did before access policies existed
        elif not self.access.work_bits:
            body["access"].pop("work_bits")  # private runs without work: as before it existed
        if not self.diloco.robust.trim:
            body["diloco"]["robust"].pop("trim")  # off: the hash of specs from before the trimmed mean
        if not self.trust.anchors:
            body.pop("trust")  # no anchors: as before they existed
        if self.rounds.exchange == "full":
            del body["rounds"]["exchange"], body["rounds"]["row_size"]  # as before tree rounds
        if not self.diloco.robust.earn_rounds:
            body["diloco"]["robust"].pop("earn_rounds")  # off: as before earned weight
        if not self.diloco.robust.check_agreement:
            body["diloco"]["robust"].pop("check_agreement")  # off: as before checked contributions
        canonical = json.dumps({"spec_version": SPEC_VERSION, **body}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).digest()


def to_dict(spec: RunSpec) -> dict[str, Any]:
    out = dataclasses.asdict(spec)
    if out["diloco"]["compression"] is None:
        out["diloco"]["compression"] = {"enabled": False}
    out["diloco"]["inner"]["betas"] = list(out["diloco"]["inner"]["betas"])
    return out


# ------------------------------------------------------------------ TOML reading

_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "diloco": DiLoCoConfig,
    "diloco.inner": InnerConfig,
    "diloco.outer": OuterConfig,
    "diloco.compression": CompressionConfig,
    "diloco.robust": RobustConfig,
    "rounds": RoundPolicy,
    "access": AccessPolicy,
    "trust": TrustPolicy,
}


def _build(cls: type, table: dict[str, Any], where: str, path: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ValueError(f"{path}: unknown key {name!r}")
        default = getattr(cls(), key)
        sub = f"{where}.{key}" if where else key
        if sub in _SECTIONS:
            if key == "compression" and isinstance(value, dict) and value.get("enabled") is False:
                if len(value) != 1:
                    raise ValueError(f"{path}: {name} has enabled = false and other keys")
                kwargs[key] = None
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{path}: {name} must be a table")
            value = {k: v for k, v in value.items() if not (key == "compression" and k == "enabled" and v is True)}
            kwargs[key] = _build(_SECTIONS[sub], value, sub, path)
            continue
        kwargs[key] = _coerce(default, value, name, path)
    obj = cls(**kwargs)
    return obj


def _coerce(default: Any, value: Any, name: str, path: str) -> Any:
    def wrong(expected: str) -> ValueError:
        return ValueError(f"{path}: {name} must be {expected}, got {type(value).__name__} {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or len(value) != len(default):
            raise wrong(f"a list of {len(default)} numbers")
        return tuple(_coerce(d, v, name, path) for d, v in zip(default, value))
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return list(value)
    raise AssertionError(f"no coercion for {name}")


def load_spec(path: str | None) -> RunSpec:
    """The spec in the TOML file at `path`, or the embedded default when `path` is None."""
    if path is None:
        spec = RunSpec()
        spec.validate()
        return spec
    return _from_table(read_toml(path, "run spec"), path)


def parse_spec(text: str, origin: str) -> RunSpec:
    """The spec in TOML `text` (an invite carries one); errors name `origin`."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"run spec {origin}: not valid TOML: {e}") from None
    return _from_table(table, origin)


def _from_table(table: dict[str, Any], path: str) -> RunSpec:
    version = table.pop("spec_version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise ValueError(f"{path}: spec_version {version!r}; this build reads {SPEC_VERSION}")
    spec = _build(RunSpec, table, "", path)
    try:
        spec.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return spec


# ------------------------------------------------------------------ TOML writing


def to_toml(spec: RunSpec) -> str:
    body = to_dict(spec)
    lines = [f"# locoswarm run spec; hash {spec.hash().hex()}", f"spec_version = {SPEC_VERSION}"]
    scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    _tables(body, "", lines)
    return "\n".join(lines) + "\n"


def _tables(body: dict[str, Any], prefix: str, lines: list[str]) -> None:
    for key, value in body.items():
        if not isinstance(value, dict):
            continue
        name = f"{prefix}{key}"
        lines.append("")
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in value.items() if not isinstance(v, dict)]
        _tables(value, f"{name}.", lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise AssertionError(f"cannot write {type(v).__name__} to TOML")


def write_spec(spec: RunSpec, path: str, *, force: bool = False) -> None:
    """Write `spec` atomically (temporary file, fsync, rename); refuse to overwrite unless `force`."""
    spec.validate()
    if os.path.exists(path) and not force:
        raise ValueError(f"{path} exists; pass --force to overwrite it")
    write_atomic(path, to_toml(spec))
