"""Listen ports that survive a restart (node/ports.py): the ports a peer first listened on
are asked for again on its state directory; the file they are kept in is untrusted."""

from __future__ import annotations

import json

import pytest

from locoswarm.node import ports

LISTEN = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1", "/ip6/::/tcp/0", "/ip4/127.0.0.1/tcp/4001"]


def test_port_zero_addresses_take_the_remembered_port_of_their_transport_and_explicit_ports_stay():
    assert ports.pinned(LISTEN, {"tcp": 40123, "udp": 50123}) == [
        "/ip4/0.0.0.0/tcp/40123", "/ip4/0.0.0.0/udp/50123/quic-v1", "/ip6/::/tcp/40123", "/ip4/127.0.0.1/tcp/4001"]
    assert ports.pinned(LISTEN, {"udp": 50123})[0] == "/ip4/0.0.0.0/tcp/0", "no tcp port kept: the OS picks"
    assert ports.pinned(LISTEN, {}) == LISTEN


def test_the_first_tcp_and_udp_ports_listened_on_are_kept_and_read_back(tmp_path):
    seen = ["/ip4/127.0.0.1/tcp/40123/p2p/QmX", "/ip4/10.0.0.2/tcp/40123/p2p/QmX",
            "/ip4/127.0.0.1/udp/50123/quic-v1/p2p/QmX"]
    assert ports.listened(seen) == {"tcp": 40123, "udp": 50123}
    ports.remember(str(tmp_path), ports.listened(seen))
    assert ports.remembered(str(tmp_path)) == {"tcp": 40123, "udp": 50123}
    assert not [p.name for p in tmp_path.iterdir() if p.name != ports.PORTS_FILE], "no temporary file left"


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"tcp": "40123"}', '{"tcp": 0}', '{"tcp": 70000}',
                                  '{"tcp": true}', '{"sctp": 4000}'])
def test_a_bad_ports_file_is_ignored_and_a_good_entry_beside_a_bad_one_is_kept(tmp_path, text):
    (tmp_path / ports.PORTS_FILE).write_text(text)
    assert ports.remembered(str(tmp_path)) == {}
    (tmp_path / ports.PORTS_FILE).write_text(json.dumps({"tcp": 4001, "udp": -1}))
    assert ports.remembered(str(tmp_path)) == {"tcp": 4001}


def test_no_ports_file_means_nothing_remembered(tmp_path):
    assert ports.remembered(str(tmp_path / "missing")) == {}


def _rec(peer: str, *addrs: str):
    from locoswarm.protocol.records import PeerRecord

    return PeerRecord(peer_id=peer, addrs=addrs, device="cpu", tokens_per_s=1.0, round=3, spec_hash=b"h" * 32)


def test_the_peers_of_the_last_view_are_kept_by_their_first_tcp_address_and_read_back(tmp_path):
    ports.remember_peers(str(tmp_path), [_rec("QmA", "/ip4/127.0.0.1/udp/9/quic-v1", "/ip4/127.0.0.1/tcp/4001"),
                                          _rec("QmB", "/ip4/10.0.0.7/tcp/4002/p2p/QmB")])
    assert ports.seen_peers(str(tmp_path)) == ["/ip4/127.0.0.1/tcp/4001/p2p/QmA", "/ip4/10.0.0.7/tcp/4002/p2p/QmB"]
    many = [_rec(f"Qm{i}", f"/ip4/127.0.0.1/tcp/{5000 + i}") for i in range(ports.MAX_SEEN + 10)]
    ports.remember_peers(str(tmp_path), many)
    assert len(ports.seen_peers(str(tmp_path))) == ports.MAX_SEEN
    assert sorted(p.name for p in tmp_path.iterdir()) == [ports.PEERS_FILE], "no temporary file left"


@pytest.mark.parametrize("text", ["", "{", '{"a": 1}', '"x"', '[1, null, "/ip4/1.2.3.4/tcp/1"]',
                                  '["/ip4/1.2.3.4/tcp/1/p2p/../../etc", "/ip4/1.2.3.4/tcp/1/p2p/QmOk"]'])
def test_a_bad_peers_file_gives_no_peers_but_the_good_entries_beside_bad_ones(tmp_path, text):
    (tmp_path / ports.PEERS_FILE).write_text(text)
    good = ["/ip4/1.2.3.4/tcp/1/p2p/QmOk"] if "QmOk" in text else []
    assert ports.seen_peers(str(tmp_path)) == good
