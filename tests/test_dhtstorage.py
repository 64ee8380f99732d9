"""protocol/dhtstorage.py: what a py-libp2p DHT node (net/dhtserver.py) keeps of what callers
store, without I/O: hivemind's rules for regular values and dictionaries, its record validator's
verdict on signed entries, and the bounds that keep untrusted callers from taking a volunteer's
memory or pushing out what others stored. The node answering hivemind nodes over the wire:
tests/test_net_daemon.py."""

from __future__ import annotations

import math

import pytest

from locoswarm.protocol.dhtrecords import (DICTIONARY_TAG, REGULAR_TAG, DictionaryEntry, DictionaryValue, dht_id,
                                           dumps, load_identity, loads, new_identity_file, sign_record)
from locoswarm.protocol.dhtstorage import MAX_AHEAD_S, DHTStorage
from locoswarm.protocol.pbmessages import ResultType

NOW = 1_000_000.0
KEY = dht_id("locoswarm:run:peers:0:0")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def me():
    return load_identity(new_identity_file())


@pytest.fixture
def clock():
    return Clock()


def entries(storage: DHTStorage, key: bytes = KEY) -> dict:
    found = storage.find(key)
    assert found.type == ResultType.FOUND_DICTIONARY, found
    value = loads(found.value)
    assert isinstance(value, DictionaryValue) and value.latest_expiration == found.expiration_time
    return {e.subkey: (loads(e.value.split(b"[signature:")[0]), e.expiration) for e in value.entries}


def signed_entry(me, value: object, expiration: float, key: bytes = KEY) -> tuple[bytes, bytes]:
    subkey = me.peer_id.encode() + me.owner_marker
    tag = dumps(subkey)
    return tag, sign_record(key, tag, dumps(value), expiration, me.private_key)


def test_a_regular_value_is_kept_until_a_newer_one_and_served_until_it_expires(clock):
    storage = DHTStorage(clock)
    assert storage.store(KEY, REGULAR_TAG, dumps("a"), NOW + 60)
    assert not storage.store(KEY, REGULAR_TAG, dumps("older"), NOW + 30), "an older value does not replace it"
    assert storage.store(KEY, REGULAR_TAG, dumps("b"), NOW + 90)
    found = storage.find(KEY)
    assert (found.type, loads(found.value), found.expiration_time) == (ResultType.FOUND_REGULAR, "b", NOW + 90)
    clock.now = NOW + 91
    assert storage.find(KEY).type == ResultType.NOT_FOUND and len(storage) == 0 and storage.bytes == 0


def test_dictionary_entries_merge_by_subkey_and_the_newest_of_each_wins(clock, me):
    storage = DHTStorage(clock)
    assert storage.store(KEY, dumps(b"s1"), dumps(1), NOW + 60)
    assert storage.store(KEY, dumps(b"s2"), dumps(2), NOW + 30)
    assert storage.store(KEY, dumps(b"s1"), dumps(11), NOW + 70)
    assert not storage.store(KEY, dumps(b"s1"), dumps("stale"), NOW + 65)
    tag, value = signed_entry(me, "record", NOW + 50)
    assert storage.store(KEY, tag, value, NOW + 50)
    assert entries(storage) == {b"s1": (11, NOW + 70), b"s2": (2, NOW + 30),
                                me.peer_id.encode() + me.owner_marker: ("record", NOW + 50)}
    clock.now = NOW + 40  # s2 expired: dropped as the key is read
    assert set(entries(storage)) == {b"s1", me.peer_id.encode() + me.owner_marker}


def test_entries_under_an_owner_marker_need_the_owners_signature(clock, me):
    storage = DHTStorage(clock)
    tag, value = signed_entry(me, "mine", NOW + 60)
    forged = dumps("not mine") + value[len(dumps("mine")):]  # the signature of another value
    assert not storage.store(KEY, tag, forged, NOW + 60)
    assert not storage.store(KEY, tag, dumps("unsigned"), NOW + 60)
    assert not storage.store(KEY, tag, value, NOW + 61), "signed for another expiration"
    other = load_identity(new_identity_file())
    theirs = dumps(other.peer_id.encode() + other.owner_marker)
    assert not storage.store(KEY, theirs, value, NOW + 60), "my signature under another owner's subkey"
    assert storage.refused == 4 and storage.find(KEY).type == ResultType.NOT_FOUND
    assert storage.store(KEY, tag, value, NOW + 60)


@pytest.mark.parametrize("expiration", [NOW - 1, NOW, NOW + MAX_AHEAD_S + 1, math.nan, math.inf])
def test_an_expiration_in_the_past_or_too_far_ahead_is_refused(clock, expiration):
    storage = DHTStorage(clock)
    assert not storage.store(KEY, REGULAR_TAG, dumps("x"), expiration)
    assert not storage.store(KEY, dumps(b"s"), dumps("x"), expiration)
    assert len(storage) == 0


def test_malformed_keys_tags_and_dictionaries_are_refused(clock):
    storage = DHTStorage(clock)
    assert not storage.store(b"short", REGULAR_TAG, dumps("x"), NOW + 60)
    assert not storage.store(KEY, b"\xc1", dumps("x"), NOW + 60), "a tag that is not msgpack"
    assert not storage.store(KEY, DICTIONARY_TAG, b"\xc1", NOW + 60), "a dictionary that is not msgpack"
    assert not storage.store(KEY, DICTIONARY_TAG, dumps([1, 2]), NOW + 60), "a list is no dictionary"
    assert len(storage) == 0 and storage.refused == 4


def test_a_whole_dictionary_is_taken_entry_by_entry_its_forged_ones_left_out(clock, me):
    storage = DHTStorage(clock)
    tag, value = signed_entry(me, "mine", NOW + 60)
    forged = dumps("not mine") + value[len(dumps("mine")):]
    whole = DictionaryValue(latest_expiration=NOW + 80, entries=(
        DictionaryEntry(b"plain", dumps("p"), NOW + 80), DictionaryEntry(loads(tag), forged, NOW + 60),
        DictionaryEntry(b"gone", dumps("g"), NOW - 5)))
    assert storage.store(KEY, DICTIONARY_TAG, dumps(whole), NOW + 80)
    assert entries(storage) == {b"plain": ("p", NOW + 80)}
    assert storage.refused == 2


def test_regular_values_and_dictionaries_hold_a_key_by_expiration(clock):
    storage = DHTStorage(clock)
    assert storage.store(KEY, REGULAR_TAG, dumps("r"), NOW + 60)
    assert not storage.store(KEY, dumps(b"s"), dumps(1), NOW + 50), "an older entry does not replace the value"
    assert storage.store(KEY, dumps(b"s"), dumps(1), NOW + 70)
    assert entries(storage) == {b"s": (1, NOW + 70)}
    assert not storage.store(KEY, REGULAR_TAG, dumps("r2"), NOW + 65), "older than the dictionary's newest entry"
    assert storage.store(KEY, REGULAR_TAG, dumps("r3"), NOW + 75)
    assert storage.find(KEY).type == ResultType.FOUND_REGULAR


def test_the_bounds_refuse_what_does_not_fit_and_keep_what_others_stored(clock):
    storage = DHTStorage(clock, max_keys=2, max_entries=2, max_bytes=200)
    k1, k2, k3 = (dht_id(f"k{i}") for i in range(3))
    assert storage.store(k1, dumps(b"a"), dumps("x"), NOW + 60)
    assert storage.store(k1, dumps(b"b"), dumps("y"), NOW + 60)
    assert not storage.store(k1, dumps(b"c"), dumps("z"), NOW + 60), "a third entry of one key"
    assert storage.store(k1, dumps(b"a"), dumps("x2"), NOW + 61), "a newer copy of a held entry still fits"
    assert storage.store(k2, REGULAR_TAG, dumps("v"), NOW + 60)
    assert not storage.store(k3, REGULAR_TAG, dumps("v"), NOW + 60), "a third key"
    assert not storage.store(k2, REGULAR_TAG, dumps("w" * 300), NOW + 61), "beyond the bytes"
    assert storage.bytes <= 200 and set(entries(storage, k1)) == {b"a", b"b"}
    assert loads(storage.find(k2).value) == "v"
    clock.now = NOW + 62  # all expired: room again as keys are touched
    assert storage.find(k1).type == storage.find(k2).type == ResultType.NOT_FOUND
    assert storage.store(k3, REGULAR_TAG, dumps("v"), NOW + 120) and storage.bytes == len(dumps("v"))
