"""Unit tests of locoswarm.workload: corpus sharding, document loading, batch
sampling, the decoder model and the tokenizers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from locoswarm.workload.data import BatchSampler, Corpus, DataConfig, load_documents, tokenize
from locoswarm.workload.model import build_model, model_config
from locoswarm.workload.tokenizer import ByteTokenizer, GPT2Tokenizer, get_tokenizer

SEQ_LEN, BLOCK_LEN, NUM_BLOCKS = 16, 64, 40


def _tokens(extra: int = 23) -> np.ndarray:
    # Token value = position, so a token tells which block it came from.
    return np.arange(NUM_BLOCKS * BLOCK_LEN + extra, dtype=np.uint16)


def _corpus(seed: int = 0, eval_fraction: float = 0.1) -> Corpus:
    cfg = DataConfig(source="synthetic", seq_len=SEQ_LEN, block_len=BLOCK_LEN, eval_fraction=eval_fraction, seed=seed)
    return Corpus(_tokens(), cfg)


# --------------------------------------------------------------------------- corpus


def test_corpus_cuts_whole_blocks_and_drops_the_tail() -> None:
    corpus = _corpus()
    assert corpus.blocks.shape == (NUM_BLOCKS, BLOCK_LEN)
    assert np.array_equal(corpus.blocks.reshape(-1), _tokens()[: NUM_BLOCKS * BLOCK_LEN])
    assert corpus.num_tokens == len(_tokens())
    assert len(corpus.eval_blocks) == round(0.1 * NUM_BLOCKS)


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 7, 36])
def test_shards_are_disjoint_and_with_the_eval_split_cover_every_block_once(num_replicas: int) -> None:
    corpus = _corpus()
    shards = [corpus.shards_for(i, num_replicas) for i in range(num_replicas)]
    for i in range(num_replicas):
        for j in range(i + 1, num_replicas):
            assert not set(shards[i].tolist()) & set(shards[j].tolist())
    everything = np.concatenate([corpus.eval_blocks, *shards])
    assert sorted(everything.tolist()) == list(range(NUM_BLOCKS))
    assert not set(corpus.eval_blocks.tolist()) & set(np.concatenate(shards).tolist())
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_corpus_split_is_deterministic_for_a_seed() -> None:
    a, b = _corpus(seed=3), _corpus(seed=3)
    assert np.array_equal(a.eval_blocks, b.eval_blocks)
    assert np.array_equal(a.train_blocks, b.train_blocks)
    for i in range(3):
        assert np.array_equal(a.shards_for(i, 3), b.shards_for(i, 3))


def test_corpus_split_differs_between_seeds() -> None:
    a, b = _corpus(seed=0), _corpus(seed=1)
    assert not np.array_equal(np.concatenate([a.eval_blocks, a.train_blocks]), np.concatenate([b.eval_blocks, b.train_blocks]))
    assert sorted(a.train_blocks.tolist() + a.eval_blocks.tolist()) == sorted(b.train_blocks.tolist() + b.eval_blocks.tolist())


def test_corpus_holds_out_at_least_one_eval_block() -> None:
    corpus = _corpus(eval_fraction=0.001)
    assert len(corpus.eval_blocks) == 1
    assert corpus.num_shards == NUM_BLOCKS - 1


@pytest.mark.parametrize("replica, num_replicas", [(-1, 2), (2, 2), (0, 0)])
def test_shards_for_rejects_a_replica_outside_the_range(replica: int, num_replicas: int) -> None:
    with pytest.raises(ValueError, match="replica"):
        _corpus().shards_for(replica, num_replicas)


def test_shards_for_rejects_more_replicas_than_training_blocks() -> None:
    corpus = _corpus()
    with pytest.raises(ValueError, match=f"{corpus.num_shards} training blocks"):
        corpus.shards_for(0, corpus.num_shards + 1)


@pytest.mark.parametrize("length", [0, BLOCK_LEN, 2 * BLOCK_LEN - 1])
def test_corpus_smaller_than_two_blocks_is_rejected_naming_seq_len(length: int) -> None:
    cfg = DataConfig(source="tiny", seq_len=SEQ_LEN, block_len=BLOCK_LEN, seed=0)
    with pytest.raises(ValueError, match=r"data\.seq_len=16"):
        Corpus(np.arange(length, dtype=np.uint16), cfg)


def test_corpus_block_is_at_least_one_sequence_plus_its_target() -> None:
    cfg = DataConfig(source="s", seq_len=SEQ_LEN, block_len=8, seed=0)
    corpus = Corpus(_tokens(), cfg)
    assert corpus.block_len == SEQ_LEN + 1
    assert corpus.blocks.shape[1] == SEQ_LEN + 1


def test_eval_batches_come_from_eval_blocks_only() -> None:
    corpus = _corpus()
    batches = corpus.eval_batches(num_sequences=10, batch_size=4)
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    eval_ids = set(corpus.eval_blocks.tolist())
    for x, y in batches:
        assert x.shape[1] == SEQ_LEN and torch.equal(y, x + 1)
        assert set((x // BLOCK_LEN).reshape(-1).tolist()) <= eval_ids


# --------------------------------------------------------------------------- documents


def test_load_documents_rejects_a_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_documents(str(missing))


def test_load_documents_rejects_a_folder_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("not a corpus file")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*no .txt or .jsonl"):
        load_documents(str(tmp_path))


def test_load_documents_rejects_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_documents(str(tmp_path))


def test_load_documents_rejects_a_bad_jsonl_line_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: not valid JSON")):
        load_documents(str(tmp_path))


def test_load_documents_rejects_a_jsonl_object_without_text(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: expected an object")):
        load_documents(str(tmp_path))


def test_load_documents_reads_txt_and_jsonl_files(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n" + json.dumps({"text": "second ü"}) + "\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.txt").write_text("plain text file\nwith two lines")
    (tmp_path / "ignored.md").write_text("never read")
    docs = load_documents(str(tmp_path))
    assert sorted(docs) == sorted(["first doc", "second ü", "plain text file\nwith two lines"])


def test_load_documents_joins_sources_with_plus(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "x.txt").write_text("from one")
    (two / "y.txt").write_text("from two")
    assert load_documents(f"{one}+{two}") == ["from one", "from two"]


def test_load_documents_rejects_an_unknown_builtin() -> None:
    with pytest.raises(ValueError, match="unknown builtin corpus 'nope'"):
        load_documents("builtin:nope")


def test_tokenize_joins_documents_with_the_end_of_text_id() -> None:
    tokens = tokenize(["ab", "é"], ByteTokenizer())
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [97, 98, 256, 0xC3, 0xA9, 256]


# --------------------------------------------------------------------------- batches


def test_batch_sampler_with_the_same_seed_gives_the_same_batches() -> None:
    corpus = _corpus()
    a, b = corpus.sampler(0, 2, seed=11), corpus.sampler(0, 2, seed=11)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(5), b.next_batch(5)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = corpus.sampler(0, 2, seed=12)
    assert not torch.equal(corpus.sampler(0, 2, seed=11).next_batch(5)[0], c.next_batch(5)[0])


def test_batch_sampler_targets_are_inputs_shifted_by_one_from_the_replicas_shards() -> None:
    corpus = _corpus()
    shards = set(corpus.shards_for(1, 3).tolist())
    sampler = corpus.sampler(1, 3, seed=4)
    for _ in range(4):
        x, y = sampler.next_batch(6)
        assert x.shape == y.shape == (6, SEQ_LEN) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y, x + 1)  # tokens are positions: the next token is the next position
        # a window never crosses a block boundary
        assert torch.equal(x[:, 0] // BLOCK_LEN, y[:, -1] // BLOCK_LEN)
        assert set((x[:, 0] // BLOCK_LEN).tolist()) <= shards


def test_batch_sampler_draws_only_from_the_given_shard_ids(np_rng: np.random.Generator) -> None:
    blocks = np_rng.integers(0, 1000, size=(6, 40))
    sampler = BatchSampler(blocks, np.array([2, 5]), seq_len=9, seed=0)
    x, y = sampler.next_batch(32)
    rows = {tuple(r) for r in blocks[[2, 5]].tolist()}
    for xi, yi in zip(x.tolist(), y.tolist()):
        window = xi + yi[-1:]
        assert any(any(row[s : s + 10] == tuple(window) for s in range(31)) for row in rows)


# --------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return build_model("tiny", 257, 64, seed=0)


def test_decoder_loss_does_not_depend_on_the_slice_size(tiny_model: torch.nn.Module, gen: torch.Generator) -> None:
    tokens = torch.randint(0, 257, (3, 20), generator=gen)
    targets = torch.randint(0, 257, (3, 20), generator=gen)
    with torch.no_grad():
        full = tiny_model.loss(tokens, targets)
        sliced = tiny_model.loss(tokens, targets, slice_tokens=7)
        logits = tiny_model(tokens)
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 257).float(), targets.reshape(-1))
    assert torch.isfinite(full)
    assert abs(float(full) - float(sliced)) <= 1e-5
    assert abs(float(full) - float(reference)) <= 1e-5
    # an untrained model is close to uniform over the vocabulary
    assert abs(float(full) - np.log(257)) < 0.5


def test_build_model_is_deterministic_for_a_seed(tiny_model: torch.nn.Module) -> None:
    again = build_model("tiny", 257, 64, seed=0)
    a, b = dict(tiny_model.state_dict()), dict(again.state_dict())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_model_with_another_seed_differs(tiny_model: torch.nn.Module) -> None:
    other = build_model("tiny", 257, 64, seed=1)
    pairs = list(zip(tiny_model.parameters(), other.parameters()))
    assert any(not torch.equal(p, q) for p, q in pairs)
    assert not torch.equal(tiny_model.embed.weight, other.embed.weight)


def test_build_model_leaves_the_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    build_model("tiny", 257, 16, seed=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_model_config_rejects_an_unknown_size() -> None:
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        model_config("huge", 257, 64)


def test_decoder_rejects_a_sequence_longer_than_max_seq_len(gen: torch.Generator) -> None:
    model = build_model("tiny", 257, 8, seed=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.loss(torch.randint(0, 257, (1, 9), generator=gen), torch.randint(0, 257, (1, 9), generator=gen))


# --------------------------------------------------------------------------- tokenizers


def test_gpt2_tokenizer_encodes_hello_world_as_gpt2_does() -> None:
    tok = GPT2Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert (tok.vocab_size, tok.eot) == (50257, 50256)


def test_byte_tokenizer_round_trips_unicode() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld ✓ 日本語 \U0001f600\n\ttab"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eot]) == text


def test_get_tokenizer_rejects_an_unknown_name() -> None:
    assert get_tokenizer("byte").name == "byte"
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")


def test_linear_cross_entropy_matches_the_plain_loss_and_gradients_without_keeping_logits() -> None:
    """The sliced loss and its gradients equal plain cross-entropy of h · Wᵀ (slices not
    dividing N included), and nothing of N × V size is saved for backward."""
    import torch.nn.functional as F

    from locoswarm.workload.model import linear_cross_entropy

    gen = torch.Generator().manual_seed(3)
    n, d, v = 300, 32, 1000
    h = torch.randn(n, d, generator=gen).requires_grad_()
    w = (0.1 * torch.randn(v, d, generator=gen)).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ours = linear_cross_entropy(h, w, y, slice_tokens=64)
    ours.backward(torch.tensor(2.0))
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), y)
    ref.backward(torch.tensor(2.0))
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(got[0], h.grad)
    torch.testing.assert_close(got[1], w.grad)
    assert max(saved) <= max(n, v) * d < n * v, saved


def test_a_large_vocabulary_is_padded_with_rows_that_stay_zero_and_change_nothing() -> None:
    """GPT-2's 50257 rows are padded to 50304 (a multiple of 64, for Hopper's matmul
    kernels): the real rows are drawn exactly as an unpadded table's, the padding starts at
    zero, gets no gradient, and the loss equals plain cross-entropy over the real rows."""
    import torch.nn.functional as F

    from locoswarm.workload.model import padded_vocab

    assert padded_vocab(257) == 257 and padded_vocab(50257) == 50304
    torch.manual_seed(0)
    model = build_model("small", 50257, 16, seed=0)
    w = model.embed.weight
    assert w.shape[0] == 50304 and bool((w[50257:] == 0).all())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (2, 16), generator=gen)
    y = torch.randint(0, 50257, (2, 16), generator=gen)
    loss = model.loss(x, y)
    loss.backward()
    assert bool((w.grad[50257:] == 0).all())
    with torch.no_grad():
        logits = model(x)
    assert logits.shape[-1] == 50257
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 50257), y.reshape(-1)))
