"""Invites: one copy-paste string that hands a volunteer a run.

`locoswarm run invite` packs the run spec (its initial peers set to the addresses to join
through) into a string signed by the organiser's key, the libp2p identity of the
organiser's own node, so that the signer is a peer id: the one the joiner can pin
(`--organiser`) and, where the spec names trust anchors, one of them. `node join --invite`
checks the string before anything starts: its form and size, the signature, the expiry,
the signer against the pin and the anchors, and the spec inside as strictly as a spec file.

Format (version 1): `locoswarm-invite:1:` followed by unpadded base64url of a zlib-compressed
msgpack array [body, public key, signature]. The body is a msgpack map {"spec": TOML text,
"issued": unix seconds, "expires": unix seconds or 0 for never}; the public key is RSA in the
OpenSSH form hivemind's records carry; the signature is RSA-PSS/SHA-256 (hivemind's) over
SIGNED_PREFIX + body. Read as untrusted: every length is bounded before it is allocated.

The signature proves the string is whole and whose it is; it cannot tell a joiner whether to
trust that organiser. Pin the peer id the organiser publishes (`--organiser`), or trust the
channel the invite came through; a spec with trust anchors accepts only their invites.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import time
import zlib
from dataclasses import dataclass

import msgpack

from locoswarm.node.spec import RunSpec, parse_spec, to_toml

PREFIX = "locoswarm-invite:1:"
SIGNED_PREFIX = b"locoswarm-invite/1\0"
"""What the signature covers before the body: an invite signature can be lifted into nothing else."""
MAX_TOKEN_CHARS = 48 * 1024
"""The longest invite read: a spec and a few dozen addresses compress to about 2 KB."""
MAX_BODY_BYTES = 256 * 1024
"""The most the compressed payload may expand to (a zip bomb stops here)."""
MAX_PEERS = 32
"""Addresses to join through an invite may carry."""
MAX_KEY_BYTES = 4096
MAX_SIGNATURE_BYTES = 1024


class InviteError(ValueError):
    """An invite that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Invite:
    spec: RunSpec
    """The run, with the addresses to join through as its initial peers."""
    organiser: str
    """The base58 peer id whose key signed the invite."""
    issued: int
    expires: int
    """Unix seconds; 0: never."""


def make_invite(spec: RunSpec, peers: list[str], key, *, valid_s: float = 0, now: float | None = None) -> str:
    """The invite to `spec` joined through `peers` (multiaddrs with /p2p/<id>), signed with
    `key` (hivemind's RSAPrivateKey: the organiser node's identity, node/statedir.identity_key)."""
    peers = check_peers(peers)
    if not peers:
        raise InviteError("an invite needs at least one address to join through (with /p2p/<peer id>)")
    spec = dataclasses.replace(spec, initial_peers=peers)
    spec.validate()
    issued = int(time.time() if now is None else now)
    body = msgpack.packb({"spec": to_toml(spec), "issued": issued,
                          "expires": issued + int(valid_s) if valid_s > 0 else 0}, use_bin_type=True)
    signature = base64.b64decode(key.sign(SIGNED_PREFIX + body))
    public = key.get_public_key().to_bytes()
    packed = zlib.compress(msgpack.packb([body, public, signature], use_bin_type=True), 9)
    return PREFIX + base64.urlsafe_b64encode(packed).rstrip(b"=").decode()


def check_peers(peers: list[str]) -> list[str]:
    """`peers` as an invite may carry them: each a multiaddr ending in /p2p/<peer id>, at
    most MAX_PEERS, duplicates dropped; InviteError naming the first bad one."""
    from locoswarm.node.checks import SettingError, check_peer

    out: list[str] = []
    for addr in peers:
        if not isinstance(addr, str) or not addr.startswith("/") or len(addr) > 512 or "/p2p/" not in addr \
                or not addr.rpartition("/p2p/")[2].isalnum():
            raise InviteError(f"{addr!r} is not a multiaddr ending in /p2p/<peer id>")
        try:
            check_peer("peers", addr)
        except SettingError as e:
            raise InviteError(f"{addr}: {e.problem}") from None
        if addr not in out:
            out.append(addr)
    if len(out) > MAX_PEERS:
        raise InviteError(f"{len(out)} addresses: an invite carries at most {MAX_PEERS}")
    return out


def read_invite(token: str, *, organiser: str | None = None, now: float | None = None) -> Invite:
    """The run an invite hands over, after every check (module docstring); InviteError
    saying what is wrong otherwise. `organiser`: the peer id that must have signed it."""
    from locoswarm.protocol.dhtrecords import verify_signed  # not hivemind's: a py-libp2p peer reads invites too

    token = token.strip()
    if not token.startswith(PREFIX):
        head = token.partition(":")[0] if token.startswith("locoswarm-invite") else "not an invite"
        raise InviteError(f"the invite does not start with {PREFIX!r} ({head}: copy the whole line, or update "
                          "locoswarm if it was made by a newer version)")
    if len(token) > MAX_TOKEN_CHARS:
        raise InviteError(f"the invite is {len(token)} characters long, above {MAX_TOKEN_CHARS}")
    text = token[len(PREFIX):]
    try:
        packed = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        inflate = zlib.decompressobj()
        raw = inflate.decompress(packed, MAX_BODY_BYTES)
        if inflate.unconsumed_tail:
            raise InviteError(f"the invite expands past {MAX_BODY_BYTES} bytes")
        if not inflate.eof:
            raise InviteError("the invite is cut short (copy the whole line)")
    except (binascii.Error, ValueError, zlib.error) as e:
        if isinstance(e, InviteError):
            raise
        raise InviteError(f"the invite is damaged: its text does not decode ({e}); copy the whole line") from None
    outer = _unpack(raw, "the invite")
    if not (isinstance(outer, list) and len(outer) == 3 and all(isinstance(x, bytes) for x in outer)):
        raise InviteError("the invite is not [body, key, signature]")
    body, public, signature = outer
    if len(public) > MAX_KEY_BYTES or len(signature) > MAX_SIGNATURE_BYTES:
        raise InviteError("the invite's key or signature is too long")
    try:
        signer, valid = verify_signed(public, SIGNED_PREFIX + body, signature)
    except (ValueError, TypeError) as e:
        raise InviteError(f"the invite's signing key is not an RSA public key ({e})") from None
    if not valid:
        raise InviteError(f"the invite's signature does not match its content (signer {signer}): it was altered")
    fields = _unpack(body, "the invite's body")
    if not isinstance(fields, dict) or not isinstance(fields.get("spec"), str) \
            or type(fields.get("issued")) is not int or type(fields.get("expires")) is not int:
        raise InviteError("the invite's body is not {spec, issued, expires}")
    if organiser is not None and signer != organiser:
        raise InviteError(f"the invite is signed by {signer}, not by the organiser {organiser} you named")
    clock = time.time() if now is None else now
    if fields["expires"] and clock > fields["expires"]:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(fields["expires"]))
        raise InviteError(f"the invite expired on {when}: ask the organiser ({signer}) for a new one")
    spec = parse_spec(fields["spec"], f"in the invite of {signer}")
    if spec.trust.anchors and signer not in spec.trust.anchors:
        raise InviteError(f"the invite is signed by {signer}, which is not one of the run's trust anchors "
                          f"({', '.join(spec.trust.anchors)})")
    check_peers(spec.initial_peers)
    return Invite(spec=spec, organiser=signer, issued=fields["issued"], expires=fields["expires"])


def _unpack(data: bytes, what: str):
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_BODY_BYTES,
                               max_str_len=MAX_BODY_BYTES, max_array_len=16, max_map_len=16)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as e:
        raise InviteError(f"{what} is malformed ({type(e).__name__})") from None


JOINED_SPEC = "run.toml"
"""Where a state directory keeps the spec of the run it joined by invite: a restart without
the invite (a service, a reboot) goes on with the same run."""


def spec_to_join(*, run: str | None, invite: str | None, organiser: str | None,
                 state_dir: str) -> tuple[RunSpec, Invite | None]:
    """The spec `node join` runs, and the invite it came from (None: none): the invite's,
    the file `run` names, the one this state directory joined by invite, or the embedded
    default. Reads, creates nothing."""
    from locoswarm.node.spec import load_spec

    if invite and run:
        raise ValueError("--invite and --run both given: an invite carries its run's spec, give one of them")
    if invite:
        found = read_invite(invite, organiser=organiser)
        return found.spec, found
    if run:
        return load_spec(run), None
    kept = os.path.join(state_dir, JOINED_SPEC)
    return load_spec(kept if os.path.exists(kept) else None), None


def keep_spec(state_dir: str, spec: RunSpec) -> str:
    """Write `spec` into the (locked) state directory as the run it joined; the path."""
    from locoswarm.node.files import write_atomic

    path = os.path.join(state_dir, JOINED_SPEC)
    write_atomic(path, to_toml(spec))
    return path

