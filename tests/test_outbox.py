"""protocol/outbox.py: what a progress-stream sender keeps for one peer, without I/O (node/outbox.py
drives it, on either transport)."""

from __future__ import annotations

from locoswarm.protocol.outbox import GONE_S, IDLE_S, RECORD_SLOT, RETRY_S, OutboxBook
from locoswarm.protocol.progresswire import record_frames
from locoswarm.protocol.records import PeerRecord

SPEC = bytes(32)


def frames(seq: int, addr: str = "/ip4/127.0.0.1/tcp/1"):
    return record_frames(PeerRecord(peer_id="QmPeer", addrs=(addr,), device="cpu", tokens_per_s=1.0, round=seq,
                                    spec_hash=SPEC, paused=False, incarnation=1, seq=seq))


def test_a_slot_keeps_its_latest_message_and_news_is_only_what_differs_from_what_was_sent():
    book = OutboxBook()
    assert book.put(3, b"a") and book.put(3, b"b")
    assert book.pending == {3: b"b"}
    batch, data = book.batch()
    assert batch == [(3, b"b")] and data == b"b"
    book.written(batch)
    assert book.pending == {} and book.sent == {3: b"b"}
    assert not book.put(3, b"b")  # sent already: nothing new
    assert book.put(3, b"c")


def test_a_message_put_while_its_slot_was_written_stays_pending():
    book = OutboxBook()
    book.put(3, b"a")
    batch, _ = book.batch()
    book.put(3, b"b")  # newer news arrives while "a" is on its way
    book.written(batch)
    assert book.sent == {3: b"a"} and book.pending == {3: b"b"}


def test_the_record_goes_first_whole_then_as_updates_and_whole_again_on_a_new_stream():
    book = OutboxBook()
    one, two = frames(1), frames(2)
    book.put(5, b"p5")
    book.put_record(one)
    book.stream_opened(0.0)
    batch, data = book.batch()
    assert [slot for slot, _ in batch] == [RECORD_SLOT, 5] and data == one.full + b"p5"
    book.written(batch)
    book.put_record(two)  # same base: an update on this stream
    batch, data = book.batch()
    assert data == two.update
    book.written(batch)
    book.stream_opened(1.0)  # a new stream: everything again, the record whole
    batch, data = book.batch()
    assert data == two.full + b"p5"
    moved = frames(3, addr="/ip4/127.0.0.1/tcp/2")  # another base: whole again
    book.written(batch)
    book.put_record(moved)
    assert book.batch()[1] == moved.full


def test_forget_drops_old_rounds_but_never_the_record():
    book = OutboxBook()
    book.put_record(frames(1))
    for r in (1, 2, 3):
        book.put(r, bytes([r]))
    book.written(book.batch()[0])
    book.put(4, b"\x04")
    book.forget(lambda r: r < 3)
    assert set(book.sent) == {RECORD_SLOT, 3} and set(book.pending) == {4}


def test_a_peer_is_gone_after_two_failed_opens_gone_s_apart_and_an_open_clears_it():
    book = OutboxBook()
    assert not book.open_failed(10.0)
    assert not book.open_failed(10.0 + GONE_S / 2)  # two failures, not yet GONE_S
    assert book.open_failed(10.0 + GONE_S)
    book.stream_opened(20.0)
    assert book.failing is None and not book.open_failed(30.0)


def test_pauses_double_to_their_cap_and_start_short_again_when_the_peer_is_back():
    book = OutboxBook()
    waits = []
    for _ in range(5):
        waits.append(book.wait)
        book.retried(peer_back=False)
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0] and book.wait == RETRY_S[2]
    book.retried(peer_back=True)
    assert book.wait == RETRY_S[0]


def test_a_stream_closed_by_the_receiver_tells_everything_again_after_a_pause_that_grows_while_it_recurs():
    book = OutboxBook()
    book.put(1, b"x")
    book.stream_opened(0.0)
    book.written(book.batch()[0])
    assert book.closed_by_receiver(1.0) == 0.5 and book.pending == {1: b"x"}  # closed at once: a longer pause
    book.stream_opened(2.0)
    assert book.closed_by_receiver(3.0) == 1.0
    book.stream_opened(4.0)
    assert book.closed_by_receiver(4.0 + IDLE_S + 1) == RETRY_S[0]  # after a long life: the shortest pause
