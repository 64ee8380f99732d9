"""A joiner downloads the outer state from real donor processes on loopback: intact from
one donor, from the good one when another serves corrupted chunks, from the survivor when
a donor is SIGKILLed mid-download, the newest round when donors disagree and no two agree,
the state two donors agree on over a newer single one, intact from a lone donor that sheds
streams (closes them unanswered, as one over its limits does), and intact when every chunk's
first stream is cut mid-body (each resumed where it stopped). With the state, one donor's
residual, whole, from the first donor that serves a valid one."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal

import pytest
import torch
from hivemind.p2p import P2P, PeerID

from locoswarm.node.statedownload import Downloaded, StateUnavailable, download_state
from locoswarm.protocol.state import StateSpec

DONOR = os.path.join(os.path.dirname(__file__), "peers", "serve_state.py")
_spec = importlib.util.spec_from_file_location("serve_state", DONOR)
serve_state = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_state)

pytestmark = pytest.mark.timeout(120)


def _download(addrs: list[str], on_progress=None, timeout_s: float = 10.0, attesters: frozenset[str] = frozenset(),
              target: tuple[int, str] | None = None, want_chain: str = serve_state.CHAIN):
    got = _downloaded(addrs, on_progress, timeout_s, attesters, target, want_chain)
    return got.round, got.tensors


def _downloaded(addrs: list[str], on_progress=None, timeout_s: float = 10.0, attesters: frozenset[str] = frozenset(),
                target: tuple[int, str] | None = None, want_chain: str = serve_state.CHAIN,
                residual_spec: StateSpec | None = None) -> Downloaded:
    async def go():
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=addrs)
        try:
            peers = [PeerID.from_base58(a.split("/p2p/")[1]) for a in addrs]
            got = await download_state(client, peers, serve_state.SPEC, timeout_s=timeout_s, on_progress=on_progress,
                                       attesters=attesters, target=target, residual_spec=residual_spec)
            assert got.chain == want_chain, "the donors' round chain comes with their state"
            assert got.ledger == serve_state.LEDGER, "and their ledger of earned weight"
            return got
        finally:
            await client.shutdown()

    return asyncio.run(go())


def _assert_is_the_donors_state(tensors):
    want = serve_state.state()
    assert list(tensors) == list(want)
    assert all(torch.equal(tensors[n], want[n]) for n in want)


def test_joiner_receives_the_donors_exact_state_with_progress(spawn_peers):
    seen = []
    _, addrs = spawn_peers(DONOR, "good")
    round_, tensors = _download(addrs, on_progress=lambda done, total: seen.append((done, total)))
    assert round_ == serve_state.ROUND
    _assert_is_the_donors_state(tensors)
    assert seen[-1][0] == seen[-1][1] > 1


def test_corrupted_chunks_are_fetched_again_from_the_good_donor(spawn_peers):
    _, addrs = spawn_peers(DONOR, "corrupt", "good")
    round_, tensors = _download(addrs)
    _assert_is_the_donors_state(tensors)


def test_a_donor_killed_mid_download_is_replaced_by_the_survivor(spawn_peers):
    procs, addrs = spawn_peers(DONOR, "good", "good")
    killed = []

    def kill_first(done: int, total: int) -> None:
        if done == 2 and not killed:
            os.kill(procs[0].pid, signal.SIGKILL)
            killed.append(done)

    round_, tensors = _download(addrs, on_progress=kill_first, timeout_s=5.0)
    assert killed
    _assert_is_the_donors_state(tensors)


def test_the_newest_round_wins_when_donors_disagree(spawn_peers):
    _, addrs = spawn_peers(DONOR, "stale", "good")
    round_, tensors = _download(addrs)
    assert round_ == serve_state.ROUND


def test_a_lone_donor_that_sheds_every_other_stream_still_delivers_the_state(spawn_peers):
    _, addrs = spawn_peers(DONOR, "shedding")
    round_, tensors = _download(addrs)
    assert round_ == serve_state.ROUND
    _assert_is_the_donors_state(tensors)


def test_a_donor_that_never_answers_is_given_up_with_a_clear_error(spawn_peers):
    _, addrs = spawn_peers(DONOR, "mute")
    with pytest.raises(StateUnavailable, match="manifest"):
        _download(addrs)


def test_no_valid_donor_is_a_clear_error(spawn_peers):
    _, addrs = spawn_peers(DONOR, "corrupt")
    with pytest.raises(StateUnavailable, match="chunk"):
        _download(addrs)


def test_the_state_two_donors_agree_on_wins_over_a_newer_one_shown_by_one_donor(spawn_peers):
    _, addrs = spawn_peers(DONOR, "good", "stale", "stale")
    round_, tensors = _download(addrs)
    assert round_ == serve_state.ROUND - 1, "one donor alone cannot pick a newer state over two that agree"
    _assert_is_the_donors_state(tensors)


def test_chunks_cut_mid_body_are_resumed_where_they_stopped(spawn_peers, caplog):
    _, addrs = spawn_peers(DONOR, "cutting")
    with caplog.at_level(logging.INFO, logger="locoswarm.protocol.statepull"):
        round_, tensors = _download(addrs)
    assert round_ == serve_state.ROUND
    _assert_is_the_donors_state(tensors)
    resumed = [r.getMessage() for r in caplog.records if "resuming it" in r.getMessage()]
    total = -(-serve_state.SPEC.total_bytes // serve_state.CHUNK_BYTES)
    assert len(resumed) == total, resumed  # each chunk cut once, each resumed from its half
    assert all(f"cut after {serve_state.CHUNK_BYTES // 2} bytes" in m for m in resumed[:-1]), resumed


def test_with_an_attester_the_state_is_the_one_it_serves_whatever_the_others_agree_on(spawn_peers):
    _, addrs = spawn_peers(DONOR, "stale", "good", "good")
    stale = addrs[0].split("/p2p/")[1]
    round_, tensors = _download(addrs, attesters=frozenset({stale}))
    assert round_ == serve_state.ROUND - 1, "two newer donors agreeing do not outvote the attester"
    _assert_is_the_donors_state(tensors)
    with pytest.raises(StateUnavailable, match="none of the 0 trusted donors"):
        _download(addrs, attesters=frozenset({"QmSomeoneNotAmongTheDonors"}))


def test_with_a_target_only_the_attested_round_and_chain_is_taken_whatever_newer_state_donors_agree_on(spawn_peers):
    """A peer with a ledger takes the state a majority of earned weight attests
    (node/lineage.py attested_state); two donors serving an invented lineage ahead of it,
    who would win on their agreement alone, serve nothing it takes."""
    _, addrs = spawn_peers(DONOR, "forged", "forged", "good")
    forged = serve_state.ROUND + serve_state.FORGED_ROUNDS
    round_, tensors = _download(addrs, want_chain=serve_state.FORGED_CHAIN)
    assert round_ == forged, "without a target, the newest state two donors agree on"
    assert not torch.equal(tensors["param.0"], serve_state.state()["param.0"])
    round_, tensors = _download(addrs, target=(serve_state.ROUND, serve_state.CHAIN))
    assert round_ == serve_state.ROUND
    _assert_is_the_donors_state(tensors)
    with pytest.raises(StateUnavailable, match="attested state of round 7"):
        _download(addrs[:2], target=(serve_state.ROUND, serve_state.CHAIN))
    with pytest.raises(StateUnavailable, match="attested state of round 10"):  # that round, another chain
        _download(addrs, target=(forged, serve_state.CHAIN))


def _residual_of(mode: str) -> dict[str, torch.Tensor]:
    return {n: t.float() for n, t in serve_state.residual(mode).items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_with_the_state_comes_one_donors_residual_whole_and_bit_for_bit(spawn_peers):
    """Two donors of one state serve different residuals (each its own): the joiner takes
    the first one's whole, never a mixture of chunks, bit for bit as the bfloat16 it holds."""
    _, addrs = spawn_peers(DONOR, "good", "own-residual")
    got = _downloaded(addrs, residual_spec=serve_state.RESIDUAL_SPEC)
    _assert_is_the_donors_state(got.tensors)
    _assert_same(got.residual, _residual_of("good"))
    got = _downloaded(addrs[::-1], residual_spec=serve_state.RESIDUAL_SPEC)
    _assert_same(got.residual, _residual_of("own-residual"))
    assert _downloaded(addrs).residual is None, "none asked, none taken"


def test_a_donor_without_a_residual_or_with_a_non_finite_one_is_passed_over(spawn_peers):
    """A donor of an older release (no residual) or one serving NaN: the next donor's is
    taken; when no donor serves a valid one, the state still comes, without a residual."""
    _, addrs = spawn_peers(DONOR, "no-residual", "nan-residual", "good")
    got = _downloaded(addrs[0::2], residual_spec=serve_state.RESIDUAL_SPEC)
    _assert_same(got.residual, _residual_of("good"))
    got = _downloaded(addrs[1:], residual_spec=serve_state.RESIDUAL_SPEC)
    _assert_same(got.residual, _residual_of("good"))
    got = _downloaded(addrs[:2], residual_spec=serve_state.RESIDUAL_SPEC)
    _assert_is_the_donors_state(got.tensors)
    assert got.residual is None


def test_the_chosen_state_is_the_newest_that_two_donors_agree_on_else_the_newest():
    from locoswarm.node.statedownload import choose_state
    from locoswarm.protocol.state import Manifest

    def m(round_: int, digest: bytes, ledger=()) -> Manifest:
        return Manifest(round=round_, chunk_bytes=4096, chunks=(), digest=digest, ledger=ledger)

    assert choose_state([m(9, b"x"), m(8, b"y"), m(8, b"y")]).round == 8
    assert choose_state([m(9, b"x"), m(8, b"y")]).round == 9, "no two agree: the newest"
    assert choose_state([m(9, b"x"), m(9, b"x"), m(8, b"y"), m(8, b"y")]).round == 9
    assert choose_state([m(9, b"x"), m(8, b"x"), m(8, b"x")]).round == 8, "the same body at another round is another state"
    other = (("QmSybil", 10**6),)
    assert choose_state([m(9, b"x"), m(9, b"x", other), m(8, b"y"), m(8, b"y")]).round == 8, \
        "the same body with another ledger is another state"


def test_a_donors_upload_budget_holds_whoever_asks_and_its_joiners_still_get_the_state(spawn_peers):
    """A donor with an upload budget serves two joiners at once (two identities) no faster
    than the budget allows both together, and each gets the state intact: joiners, or
    identities pretending to be, cannot take more of the volunteer's link than it gives."""
    import time

    from locoswarm.protocol.state import encode_state

    _, (addr,) = spawn_peers(DONOR, "budget")
    _, body = encode_state(serve_state.SPEC, serve_state.state(), serve_state.ROUND, serve_state.CHUNK_BYTES,
                           serve_state.CHAIN)

    async def two():
        async def one():
            client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[addr])
            try:
                return await download_state(client, [PeerID.from_base58(addr.split("/p2p/")[1])], serve_state.SPEC,
                                            timeout_s=30.0)
            finally:
                await client.shutdown()

        return await asyncio.gather(one(), one())

    started = time.monotonic()
    got = asyncio.run(two())
    elapsed = time.monotonic() - started
    for round_, tensors, *_ in got:
        assert round_ == serve_state.ROUND
        _assert_is_the_donors_state(tensors)
    # The budget lets a burst of two chunks go at once, then its rate: a faster machine cannot
    # beat this bound, a slower one only takes longer.
    floor_s = (2 * len(body) - 3 * serve_state.CHUNK_BYTES) / serve_state.BUDGET_BYTES_PER_S
    assert elapsed >= floor_s, (elapsed, floor_s)


@pytest.fixture
def one_torch_thread():
    """Training in this process on one thread, as the daemons do: with torch's default (a
    thread per core) this test took 22 s alone on 2 cores and over 120 s beside another suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_replica_that_takes_a_state_starts_where_its_donors_did_and_agrees_with_the_swarm(one_torch_thread):
    """handover.take_state with the donor's residual: the replica restarts where the donor's
    did (ahead of the outer state by its unsent progress), scores a lower held-out loss there
    than at the outer state, and its first delta agrees with the swarm's better than a
    replica started at the outer state with an empty residual (whose deltas failed the
    swarm's checks in a churn run, docs/trust.md). A residual that does not help is refused."""
    import threading
    from dataclasses import replace

    from locoswarm.node.handover import served, take_state
    from locoswarm.node.spec import RunSpec
    from locoswarm.node.trainer import Trainer
    from locoswarm.optim.check import check_round

    spec = replace(RunSpec(), num_shards=3, batch_size=4)
    stop = threading.Event()

    def trainer(shard: int) -> Trainer:
        return Trainer(spec, spec.hash(), shard=shard, device=torch.device("cpu"))

    def one_round(peers: list[Trainer], names: list[str]):
        works = []
        for t in peers:
            t.train_until(stop, lambda n: n >= t.round_tokens)
            works.append(t.end_round())
        return works, [t.decode(t.encode(w, n)) for t, w, n in zip(peers, works, names)]

    a, b = trainer(0), trainer(1)
    for _ in range(6):
        works, deltas = one_round([a, b], ["a", "b"])
        for t, w in zip((a, b), works):
            t.apply(w, deltas, overlapped=False)
    state, residual = served(a)
    assert all(t.dtype == torch.bfloat16 for t in residual.values())
    donors, empty = trainer(2), trainer(2)
    start = take_state(donors, a.round, state, a.ledger.pairs(), residual)
    assert start.donors and start.donor_loss < start.outer_loss
    assert take_state(empty, a.round, state, a.ledger.pairs()).outer_loss is None
    ahead = a.step.restart(a.outer, a.compressor)
    for p, want, o in zip(donors.model.parameters(), ahead, a.outer.params):
        assert torch.allclose(p, want, rtol=0, atol=1e-2 * float((want - o).abs().max()) + 1e-7)
    assert donors.state_digest() == empty.state_digest() == a.state_digest()

    peers = [a, b, donors, empty]
    works, deltas = one_round(peers, ["a", "b", "donors", "empty"])
    seen = {name: {c.sender: c.agreement for c in check_round(t.outer.params, w.snapshot, d, deltas,
                                                                plan_tokens=t.round_tokens)}
            for name, t, w, d in zip(("a", "b"), peers, works, deltas)}
    print(f"held-out loss {start.donor_loss:.4f} from the donor's residual, {start.outer_loss:.4f} at the outer "
          f"state; first-round agreement (thousandths) {seen}")
    assert min(s["donors"] for s in seen.values()) > max(s["empty"] for s in seen.values()), seen

    refused = trainer(2)
    noise = {n: 1e3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
             for n, t in residual.items()}
    start = take_state(refused, a.round, state, a.ledger.pairs(), noise)
    assert not start.donors and start.donor_loss > start.outer_loss
    assert "refusing" in start.describe()
    assert all(not e.any() for e in refused.compressor.errors)
    assert all(torch.equal(p, o) for p, o in zip(refused.model.parameters(), refused.outer.params))


def test_a_donor_with_a_small_upload_budget_cuts_its_state_so_that_a_joiner_is_never_refused():
    """A donor at 4 Mbit/s serving a 10 MiB state: with whole 4 MiB chunks (8 s each at that
    rate, 5 s of wait allowed) its lone joiner's fourth request was refused, and every
    request after it, manifests included (seen: joiners gave up). Cut by budget_chunk, a
    joiner asking chunk after chunk, with a residual's request beside each and a manifest
    between, waits for each but is never refused, and the whole takes the budget's time."""
    from locoswarm.node.statesync import budget_chunk
    from locoswarm.node.streams import Busy, ByteBudget

    rate, wait, total = 4e6 / 8, 5.0, 10 << 20

    def joiner(chunk: int) -> float:
        now = [0.0]
        budget = ByteBudget(rate, burst_bytes=2 * chunk, max_wait_s=wait, clock=lambda: now[0])
        for i in range(-(-total // chunk)):
            for size in (chunk, chunk // 2, 300 << 10 if i == 3 else 0):  # a chunk, a residual's, a manifest
                if size:
                    now[0] += budget.reserve(size)
        return now[0]

    with pytest.raises(Busy, match="upload budget"):
        joiner(4 << 20)
    chunk = budget_chunk(4 << 20, total, rate, wait)
    assert chunk == 1 << 20
    took = joiner(chunk)
    assert took <= (total * 1.5 + (300 << 10)) / rate


def test_a_retried_download_keeps_the_chunks_an_earlier_attempt_verified(spawn_peers):
    """Attempt 1 asks a donor that is SIGKILLed after a few chunks and fails; attempt 2,
    passed the same `kept`, asks another donor of the same state only for the rest (a
    joiner on a slow link used to start again from nothing), and the state is intact."""
    procs, addrs = spawn_peers(DONOR, "good", "good")
    peers = [PeerID.from_base58(a.split("/p2p/")[1]) for a in addrs]
    first, second = [], []

    def kill_after_three(done: int, total: int) -> None:
        first.append(done)
        if done == 3:
            os.kill(procs[0].pid, signal.SIGKILL)

    async def go():
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=addrs)
        kept: dict = {}
        try:
            with pytest.raises(StateUnavailable):
                await download_state(client, peers[:1], serve_state.SPEC, timeout_s=5.0, kept=kept,
                                     on_progress=kill_after_three)
            return await download_state(client, peers[1:], serve_state.SPEC, timeout_s=5.0, kept=kept,
                                        on_progress=lambda done, total: second.append((done, total)))
        finally:
            await client.shutdown()

    got = asyncio.run(go())
    _assert_is_the_donors_state(got.tensors)
    total = second[-1][1]
    assert max(first) >= 3 and second[0][0] == max(first) + 1, (first, second)
    assert second[-1][0] == total and len(second) == total - max(first)
