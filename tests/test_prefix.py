"""Shared prompt beginnings: computed once, reused by later prefills, exactly as if computed again."""

from __future__ import annotations

import pytest
import torch

from tests.test_decode import _model
from tuneloop.engine import _int4, _prefix
from tuneloop.engine._batch import Batch
from tuneloop.engine._decode import Decoder

pytestmark = pytest.mark.timeout(120)


def _prompts(shared: int, tails: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 320, (shared,), generator=gen).tolist()
    return [head + torch.randint(0, 320, (k,), generator=gen).tolist() for k in tails]


@pytest.fixture
def decoder():
    decoder, why = Decoder.for_model(_model("llama", num_key_value_heads=2))
    assert decoder is not None, why
    return decoder


def _prefill(decoder, prompts, owners=None):
    with torch.inference_mode():
        return decoder.prefill(prompts, owners=owners)


def test_a_shared_beginning_is_kept_and_reused_with_the_same_results(decoder):
    first = _prompts(20, (3, 5))
    _prefill(decoder, first, [None, None])  # two prompts sharing 20 tokens: those are kept
    assert len(decoder.prefixes) == 1 and decoder.prefixes.hits == 0
    # the same 20 tokens with other endings, and one prompt that shares nothing
    later = [first[0][:20] + tail for tail in ([7], [1, 2, 3, 4, 5, 6, 7], [9, 9, 9])] + [list(range(9))]
    reused, logits = _prefill(decoder, later, [None] * 4)
    assert decoder.prefixes.hits == 3 and decoder.prefixes.reused == 60
    fresh, want = _prefill(decoder, later)  # no owners: computed whole
    assert torch.allclose(logits, want, atol=1e-5, rtol=0)
    assert torch.equal(reused.mask, fresh.mask) and torch.equal(reused.pos, fresh.pos)
    for a, b in zip(reused.cache.layers, fresh.cache.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    # and decoding goes on from it as from the fresh cache
    with torch.inference_mode():
        ids = want.argmax(-1, keepdim=True)
        a, b = Batch.merge([(reused, None)], 2), Batch.merge([(fresh, None)], 2)
        assert torch.allclose(decoder.step(ids, a), decoder.step(ids, b), atol=1e-5, rtol=0)


def test_beginnings_are_kept_per_adapter_and_always_leave_a_token_to_compute(decoder):
    prompts = _prompts(24, (2, 3))
    base_owner, adapter = None, object()
    _prefill(decoder, prompts, [base_owner, base_owner])
    assert len(decoder.prefixes) == 1
    _prefill(decoder, [prompts[0]], [adapter])  # another adapter's keys and values differ: no reuse
    assert decoder.prefixes.hits == 0
    exact = prompts[0][:24]  # a prompt that is the kept beginning itself
    assert decoder.prefixes.lookup(exact, None)[0] == 23
    _, logits = _prefill(decoder, [exact], [None])
    _, want = _prefill(decoder, [exact])
    assert torch.allclose(logits, want, atol=1e-5, rtol=0)
    short = _prompts(_prefix.MIN_TOKENS - 1, (2, 2), seed=3)  # too short a beginning to keep
    before = len(decoder.prefixes)
    _prefill(decoder, short, [None, None])
    assert len(decoder.prefixes) == before


def test_the_cache_keeps_the_most_recently_used_beginnings(decoder):
    for seed in range(_prefix.ENTRIES + 2):
        _prefill(decoder, _prompts(18, (1, 2), seed=seed), [None, None])
    assert len(decoder.prefixes) == _prefix.ENTRIES
    assert decoder.prefixes.lookup(_prompts(18, (3,), seed=0)[0], None)[0] == 0  # the oldest went first
    assert decoder.prefixes.lookup(_prompts(18, (3,), seed=_prefix.ENTRIES + 1)[0], None)[0] == 18


def test_the_cache_holds_at_most_its_byte_budget(decoder, monkeypatch):
    _prefill(decoder, _prompts(18, (1, 2), seed=0), [None, None])
    one = decoder.prefixes.nbytes  # 2 layers x 2 kv heads x 16 wide x 18 tokens x keys and values x 4 bytes
    assert one == 2 * 2 * 16 * 18 * 2 * 4
    monkeypatch.setattr(_prefix, "MAX_BYTES", 2 * one)
    for seed in (1, 2, 3):
        _prefill(decoder, _prompts(18, (1, 2), seed=seed), [None, None])
    assert len(decoder.prefixes) == 2 and decoder.prefixes.nbytes == 2 * one
    _prefill(decoder, _prompts(60, (1, 2), seed=4), [None, None])  # more than the budget alone: not kept
    assert decoder.prefixes.lookup(_prompts(60, (3,), seed=4)[0], None)[0] == 0 and len(decoder.prefixes) == 2


@pytest.mark.asyncio
async def test_the_engine_reuses_a_system_prompt_and_answers_the_same(tiny_model):
    from tuneloop.engine.base import SamplingParams
    from tuneloop.engine.local import LocalEngine

    system = {"role": "system", "content": "You are the tuneloop test bot; answer briefly, kindly, and in English."}
    convs = [[system, {"role": "user", "content": q}] for q in ("hi", "What is your name?", "Do you like music?")]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    async def replies(batches: list[list]) -> list[str]:
        """Each batch of conversations one after another through an engine of its own."""
        out = []
        for convs_of_one in batches:
            eng = LocalEngine(str(tiny_model), version="t", dtype="float32", quantize="none")
            await eng.start()
            try:
                out += [(await eng.complete(c, params)).text for c in convs_of_one]
                kept = eng.stats()["prefix_cache"]  # what /dashboard and the engine's stats show
                hits = kept["hits"]
                assert kept["tokens_reused"] >= hits * _prefix.MIN_TOKENS
            finally:
                await eng.stop(grace=0)
        return out, hits

    together, hits = await replies([convs])  # the second and third start from the first two's beginning
    assert hits >= 1
    apart, none = await replies([[c] for c in convs])  # each alone in a fresh engine: nothing to reuse
    assert none == 0
    assert together == apart


@pytest.mark.skipif(_int4.library() is None, reason=f"our int4 kernel: {_int4.unavailable()}")
def test_a_prompt_prefills_the_same_alone_and_in_any_batch():
    """On a CPU each prompt attends over its own columns only (``_decode._prompt_attention``) and our int4
    kernel multiplies each row alike at any row count: a prompt's logits, keys and values are bit for bit
    the same whichever prompts, of whichever lengths, share its prefill (padded to the longest, the left
    padding moved its columns across the lanes of the sums; torch's dense product is not row-invariant)."""
    decoder, why = Decoder.for_model(_model("llama", num_key_value_heads=2), quantize="int4", quant_rows=256)
    assert decoder is not None, why
    prompts = _prompts(0, (5, 17, 9, 30), seed=3)
    _, together = _prefill(decoder, prompts)
    batch, _ = _prefill(decoder, prompts)
    for i, prompt in enumerate(prompts):
        alone, logits = _prefill(decoder, [prompt])
        assert torch.equal(logits[0], together[i]), i
        width = batch.cache.layers[0].keys.shape[2]
        for a, b in zip(alone.cache.layers, batch.cache.layers, strict=True):
            assert torch.equal(a.keys[0], b.keys[i, :, width - len(prompt):]), i
            assert torch.equal(a.values[0], b.values[i, :, width - len(prompt):]), i
