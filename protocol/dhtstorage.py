"""What a DHT node keeps (issue 22: a py-libp2p peer serving the swarm's DHT, net/dhtserver.py),
by key id, without I/O: a regular value, or a dictionary of entries by subkey, each with its
expiration, as hivemind's DHTLocalStorage keeps them. An entry is taken when it passes hivemind's
record validator (protocol/dhtrecords.py `check_record`: one under an owner marker must carry
its owner's signature), expires in the future but not beyond MAX_AHEAD_S, and is newer than
what is held for it (a newer regular value holds a key against older dictionary entries, and a
dictionary entry newer than the regular value replaces it). A whole dictionary (what a hivemind
node hands a node new near its keys) is taken entry by entry.

Everything stored comes from the network and is untrusted: the storage is bounded (keys, entries
per key, bytes in all). What does not fit is refused, not evicted, so that no caller can push out
what others stored; expired entries are dropped as their key is touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from locoswarm.protocol.dhtrecords import (DICTIONARY_TAG, REGULAR_TAG, DictionaryEntry, DictionaryValue, check_record,
                                           dumps, loads)
from locoswarm.protocol.errors import ProtocolError
from locoswarm.protocol.pbmessages import FindResult, ResultType

MAX_KEYS = 8192
MAX_ENTRIES_PER_KEY = 4096
MAX_BYTES = 64 << 20
"""Stored value bytes in all: what the DHT may take of a volunteer's memory."""
MAX_AHEAD_S = 24 * 3600.0
"""The furthest an expiration may lie ahead (the swarm's records live a minute)."""


@dataclass(slots=True)
class _Key:
    regular: tuple[bytes, float] | None = None
    """(stored bytes, expiration) of a regular value."""
    entries: dict[bytes, tuple[Any, bytes, float]] = field(default_factory=dict)
    """subkey tag → (subkey, stored bytes, expiration) of a dictionary's entries."""

    def size(self) -> int:
        return (len(self.regular[0]) if self.regular else 0) + sum(len(t) + len(v) for t, (_, v, _) in
                                                                   self.entries.items())


class DHTStorage:
    """What this node holds for the DHT (module docstring), by key id."""

    def __init__(self, clock=time.time, *, max_keys: int = MAX_KEYS, max_entries: int = MAX_ENTRIES_PER_KEY,
                 max_bytes: int = MAX_BYTES) -> None:
        self.clock = clock
        self.max_keys, self.max_entries, self.max_bytes = max_keys, max_entries, max_bytes
        self._keys: dict[bytes, _Key] = {}
        self.bytes = 0
        self.refused = 0
        """Entries refused so far (invalid, stale, or beyond the bounds)."""

    def __len__(self) -> int:
        return len(self._keys)

    def _purge(self, key_id: bytes, now: float) -> _Key | None:
        held = self._keys.get(key_id)
        if held is None:
            return None
        before = held.size()
        if held.regular is not None and held.regular[1] <= now:
            held.regular = None
        for tag in [t for t, (_, _, e) in held.entries.items() if e <= now]:
            del held.entries[tag]
        self.bytes -= before - held.size()
        if held.regular is None and not held.entries:
            del self._keys[key_id]
            return None
        return held

    def store(self, key_id: bytes, tag: bytes, value: bytes, expiration: float) -> bool:
        """Keep one entry (tag REGULAR_TAG: a regular value; DICTIONARY_TAG: a whole dictionary;
        else the msgpack of a subkey); whether it was taken."""
        now = self.clock()
        if not (isinstance(expiration, float) and now < expiration <= now + MAX_AHEAD_S) or len(key_id) != 20:
            return self._refuse()
        if tag == DICTIONARY_TAG:
            try:
                dictionary = loads(value)
            except ProtocolError:
                return self._refuse()
            if not isinstance(dictionary, DictionaryValue):
                return self._refuse()
            taken = [self._entry(key_id, e, now) for e in dictionary.entries]
            return any(taken) or not taken
        if tag == REGULAR_TAG:
            if not check_record(key_id, tag, value, expiration):
                return self._refuse()
            held = self._purge(key_id, now)
            newest = max([e for _, _, e in held.entries.values()] + [held.regular[1] if held.regular else 0.0],
                         default=0.0) if held else 0.0
            if expiration <= newest or not self._room(key_id, len(value) - (len(held.regular[0]) if held and
                                                                                held.regular else 0)):
                return self._refuse()
            held = self._keys.setdefault(key_id, _Key())
            self.bytes -= held.size()
            held.regular, held.entries = (value, expiration), {}
            self.bytes += held.size()
            return True
        try:
            subkey = loads(tag)
        except ProtocolError:
            return self._refuse()
        return self._entry(key_id, DictionaryEntry(subkey, value, expiration), now)

    def _entry(self, key_id: bytes, entry: DictionaryEntry, now: float) -> bool:
        try:
            tag = dumps(entry.subkey)
        except TypeError:
            return self._refuse()
        if not (isinstance(entry.value, bytes) and isinstance(entry.expiration, (int, float))
                and now < entry.expiration <= now + MAX_AHEAD_S and check_record(key_id, tag, entry.value,
                                                                                  float(entry.expiration))):
            return self._refuse()
        held = self._purge(key_id, now)
        old = held.entries.get(tag) if held else None
        if held is not None and held.regular is not None and held.regular[1] >= entry.expiration:
            return self._refuse()  # a newer regular value holds the key, as hivemind keeps it
        if old is not None and old[2] >= entry.expiration:
            return self._refuse()
        if old is None and held is not None and len(held.entries) >= self.max_entries:
            return self._refuse()
        grows = len(tag) + len(entry.value) - (len(tag) + len(old[1]) if old else 0)
        if not self._room(key_id, grows):
            return self._refuse()
        held = self._keys.setdefault(key_id, _Key())
        self.bytes -= held.size()
        held.regular = None
        held.entries[tag] = (entry.subkey, entry.value, float(entry.expiration))
        self.bytes += held.size()
        return True

    def _room(self, key_id: bytes, grows: int) -> bool:
        return (key_id in self._keys or len(self._keys) < self.max_keys) and self.bytes + grows <= self.max_bytes

    def _refuse(self) -> bool:
        self.refused += 1
        return False

    def find(self, key_id: bytes) -> FindResult:
        """The key's live value as a find answer (without the nearest nodes)."""
        held = self._purge(key_id, self.clock())
        if held is None:
            return FindResult(type=ResultType.NOT_FOUND)
        if held.regular is not None:
            return FindResult(type=ResultType.FOUND_REGULAR, value=held.regular[0], expiration_time=held.regular[1])
        entries = tuple(DictionaryEntry(s, v, e) for s, v, e in held.entries.values())
        latest = max(e.expiration for e in entries)
        return FindResult(type=ResultType.FOUND_DICTIONARY, value=dumps(DictionaryValue(latest_expiration=latest, entries=entries)),
                          expiration_time=latest)
