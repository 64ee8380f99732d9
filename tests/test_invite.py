"""Invites (node/invite.py): one signed line hands a volunteer a run. A whole invite gives
back the organiser's spec and addresses and names its signer; an altered, cut, oversized,
expired or foreign-signed one is refused with a message saying which, before anything is
created. With real daemons: a peer joins a run by invite alone and trains with the
organiser, and a peer that joins the same address with the wrong run stops (exit 2) naming
the run it found there, instead of training alone."""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
import sys
import zlib
from pathlib import Path

import msgpack
import pytest
from typer.testing import CliRunner

from harness import Swarm, assert_clean_exit, final, first_addr, wait_round
from locoswarm.cli.main import app
from locoswarm.node import invite as inv
from locoswarm.node.statedir import IDENTITY_FILE, _create_identity, identity_key
from locoswarm.node.spec import RunSpec, TrustPolicy, load_spec, write_spec

ADDR = "/ip4/203.0.113.5/tcp/31337/p2p/QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"


@pytest.fixture(scope="module")
def organiser(tmp_path_factory) -> tuple[Path, object, str]:
    """A state directory holding an identity, its key and its peer id."""
    from hivemind.p2p import PeerID

    folder = tmp_path_factory.mktemp("organiser")
    _create_identity(str(folder / IDENTITY_FILE))
    peer = PeerID.from_identity((folder / IDENTITY_FILE).read_bytes()).to_base58()
    return folder, identity_key(str(folder)), peer


def spec(**changes) -> RunSpec:
    return dataclasses.replace(RunSpec(), run_id="invited", seed=7, **changes)


def repack(token: str, edit) -> str:
    """`token` with its [body, key, signature] changed by `edit`, re-encoded (the signature kept)."""
    text = token[len(inv.PREFIX):]
    outer = msgpack.unpackb(zlib.decompress(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))))
    packed = zlib.compress(msgpack.packb(edit(outer), use_bin_type=True))
    return inv.PREFIX + base64.urlsafe_b64encode(packed).rstrip(b"=").decode()


def test_an_invite_gives_back_the_spec_and_peers_and_names_its_signer(organiser):
    _, key, peer = organiser
    token = inv.make_invite(spec(), [ADDR, ADDR], key)
    got = inv.read_invite(token)
    assert got.organiser == peer
    assert got.spec.hash() == spec().hash() and got.spec.run_id == "invited"
    assert got.spec.initial_peers == [ADDR]  # duplicates dropped
    assert got.expires == 0
    assert inv.read_invite("  " + token + "\n", organiser=peer).spec.hash() == spec().hash()
    assert len(token) < 4000, len(token)  # one line to paste


@pytest.mark.parametrize("damage, message", [
    (lambda t: t[:-40], "cut short|does not decode"),
    (lambda t: "locoswarm-invite:2:" + t[len(inv.PREFIX):], "does not start with"),
    (lambda t: "hello", "not an invite"),
    (lambda t: t[:len(inv.PREFIX)] + "!!" + t[len(inv.PREFIX) + 2:], "does not decode"),
    (lambda t: inv.PREFIX + "A" * (inv.MAX_TOKEN_CHARS + 1), "characters long"),
])
def test_a_damaged_invite_is_refused_saying_how(organiser, damage, message):
    token = inv.make_invite(spec(), [ADDR], organiser[1])
    with pytest.raises(inv.InviteError, match=message):
        inv.read_invite(damage(token))


def test_an_altered_body_fails_the_signature(organiser):
    token = inv.make_invite(spec(), [ADDR], organiser[1])

    def redirect(outer):
        body = msgpack.unpackb(outer[0])
        body["spec"] = body["spec"].replace("203.0.113.5", "198.51.100.9")
        return [msgpack.packb(body, use_bin_type=True), outer[1], outer[2]]

    with pytest.raises(inv.InviteError, match="signature does not match"):
        inv.read_invite(repack(token, redirect))


def test_a_payload_that_expands_past_the_limit_is_refused_before_it_is_read():
    bomb = zlib.compress(b"\0" * (inv.MAX_BODY_BYTES * 4), 9)
    token = inv.PREFIX + base64.urlsafe_b64encode(bomb).rstrip(b"=").decode()
    assert len(token) < inv.MAX_TOKEN_CHARS
    with pytest.raises(inv.InviteError, match="expands past"):
        inv.read_invite(token)


def test_an_expired_invite_a_foreign_signer_and_a_signer_outside_the_anchors_are_refused(organiser):
    _, key, peer = organiser
    token = inv.make_invite(spec(), [ADDR], key, valid_s=3600, now=1_000_000)
    assert inv.read_invite(token, now=1_000_000 + 3599).expires == 1_003_600
    with pytest.raises(inv.InviteError, match="expired on 1970-01-12"):
        inv.read_invite(token, now=1_000_000 + 3601)
    other = "QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"
    with pytest.raises(inv.InviteError, match=f"signed by {peer}, not by the organiser {other}"):
        inv.read_invite(inv.make_invite(spec(), [ADDR], key), organiser=other)
    anchored = inv.make_invite(spec(trust=TrustPolicy(anchors=[other])), [ADDR], key)
    with pytest.raises(inv.InviteError, match="not one of the run's trust anchors"):
        inv.read_invite(anchored)
    assert inv.read_invite(inv.make_invite(spec(trust=TrustPolicy(anchors=[peer])), [ADDR], key)).organiser == peer


def test_an_invite_needs_addresses_with_a_peer_id(organiser):
    for peers in ([], ["/ip4/203.0.113.5/tcp/31337"], ["not an address"], ["/ip4/203.0.113.5/tcp/31337/p2p/abc"],
                  ["/ip4/203.0.113.5/tcp/99999/p2p/QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"]):
        with pytest.raises(inv.InviteError):
            inv.make_invite(spec(), peers, organiser[1])


def test_run_invite_prints_a_join_line_and_node_join_refuses_bad_invites_before_creating_anything(
        organiser, tmp_path: Path):
    folder, _, peer = organiser
    runner = CliRunner()
    run_file = tmp_path / "run.toml"
    write_spec(spec(), str(run_file))
    done = runner.invoke(app, ["run", "invite", "--run", str(run_file), "--state-dir", str(folder), "--peer", ADDR])
    assert done.exit_code == 0, done.output
    line = done.stdout.strip()
    assert line.startswith("locoswarm node join --invite " + inv.PREFIX)
    token = line.rsplit(" ", 1)[1]
    assert inv.read_invite(token, organiser=peer).spec.initial_peers == [ADDR]

    state = tmp_path / "joiner"
    for args, message in [
        (["--invite", token, "--run", str(run_file)], "--invite and --run both given"),
        (["--invite", token[:-30]], "cut short|does not decode"),
        (["--invite", token, "--organiser", "QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"], "not by the organiser"),
    ]:
        done = runner.invoke(app, ["node", "join", "--state-dir", str(state), *args])
        assert done.exit_code == 2, done.output
        assert message.split("|")[0] in done.stderr or message.split("|")[-1] in done.stderr, done.stderr
        assert not state.exists(), "a refused invite created the state directory"

    # No identity, no address: said before anything is signed.
    done = runner.invoke(app, ["run", "invite", "--state-dir", str(tmp_path / "nobody"), "--peer", ADDR])
    assert done.exit_code == 2 and "no identity" in done.stderr, done.output
    done = runner.invoke(app, ["run", "invite", "--state-dir", str(folder)])
    assert done.exit_code == 2 and "no address to put in the invite" in done.stderr, done.output


def test_a_state_directory_that_joined_by_invite_keeps_its_run(organiser, tmp_path: Path):
    token = inv.make_invite(spec(), [ADDR], organiser[1])
    got, found = inv.spec_to_join(run=None, invite=token, organiser=None, state_dir=str(tmp_path))
    assert found is not None and got.run_id == "invited"
    path = inv.keep_spec(str(tmp_path), got)
    again, found = inv.spec_to_join(run=None, invite=None, organiser=None, state_dir=str(tmp_path))
    assert found is None and again.hash() == got.hash() and again.initial_peers == [ADDR]
    assert load_spec(path).hash() == spec().hash()
    other = tmp_path / "other.toml"
    write_spec(RunSpec(), str(other))
    assert inv.spec_to_join(run=str(other), invite=None, organiser=None,
                            state_dir=str(tmp_path))[0].hash() == RunSpec().hash()


def test_a_service_given_an_invite_passes_the_check_it_runs_before_starting(organiser, tmp_path: Path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("LOCOSWARM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("LOCOSWARM_CONFIG", os.devnull)
    monkeypatch.setenv("LOCOSWARM_STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    assert runner.invoke(app, ["config", "check", "--require-peers"]).exit_code == 2
    monkeypatch.setenv("LOCOSWARM_INVITE", inv.make_invite(spec(), [ADDR], organiser[1]))
    done = runner.invoke(app, ["config", "check", "--require-peers"])
    assert done.exit_code == 0 and "joins through 1 peer" in done.output, done.output
    monkeypatch.setenv("LOCOSWARM_INVITE", "locoswarm-invite:1:damaged")
    done = runner.invoke(app, ["config", "check", "--require-peers"])
    assert done.exit_code == 2 and "the invite" in done.output, done.output
    assert not (tmp_path / "state").exists()



@pytest.mark.slow
@pytest.mark.timeout(240, method="signal")
def test_a_volunteer_joins_by_invite_alone_and_one_with_the_wrong_run_stops_naming_it(swarm: Swarm,
                                                                                      tmp_path: Path):
    run_file = tmp_path / "run.toml"
    write_spec(spec(), str(run_file))
    a = swarm.join("a", "--min-peers", "2", "--until-round", "3", run=run_file)
    addr = first_addr(a)
    # The invite is made from the organiser's running node: its identity signs, its status gives the address.
    made = subprocess.run([sys.executable, "-m", "locoswarm", "run", "invite", str(run_file), "--state-dir",
                           str(tmp_path / "a")], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    token = made.stdout.split()[-1]
    assert addr in inv.read_invite(token).spec.initial_peers
    b = swarm.join("b", "--min-peers", "2", "--until-round", "3", "--invite", token)
    # Another volunteer was given the address but not the run (the embedded default spec).
    wrong = swarm.join("wrong", peer=addr)
    assert wrong.wait_exit(120) == 2, wrong.tail()
    assert "train another run" in wrong.stderr() and "'invited'" in wrong.stderr(), wrong.tail()
    assert not wrong.events("round"), "the peer of the wrong run trained"
    wait_round(b, 1, 120)
    for p in (a, b):
        assert_clean_exit(p, p.wait_exit(150))
    assert final(a)[2] == final(b)[2], "the invited peer and the organiser ended on different states"
    assert max(e["participants"] for e in b.events("round")) == 2
    assert load_spec(str(tmp_path / "b" / inv.JOINED_SPEC)).hash() == spec().hash()
