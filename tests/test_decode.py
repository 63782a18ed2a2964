"""The engine's fused decode step against transformers' forward, on the architectures it claims."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tuneloop.engine._batch import Batch, prefill
from tuneloop.engine._decode import Decoder
from tuneloop.engine.base import SamplingParams

pytestmark = pytest.mark.timeout(120)


def _model(kind: str, **kw):
    """A small randomly initialised model of ``kind`` (no training: the arithmetic is what is compared)."""
    import transformers as tf

    cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[kind]
    shape = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 128}
    config = getattr(tf, f"{cls}Config")(**{**shape, **kw})
    torch.manual_seed(0)
    return getattr(tf, f"{cls}ForCausalLM")(config).eval()


CASES = {
    "llama, one kv head per query head": ("llama", {"num_key_value_heads": 4}),
    "llama, grouped-query attention": ("llama", {"num_key_value_heads": 2}),
    "llama, biases everywhere": ("llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
    "llama, scaled rope": (
        "llama",
        {"num_key_value_heads": 2, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
    ),
    "llama, dynamic rope (no table)": (
        "llama",
        {"num_key_value_heads": 2, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
    ),
    # SmolLM2's shape in small: 3 query heads per key/value head, tied embeddings, many layers.
    "llama, tied embeddings, 9/3 heads, 8 layers": (
        "llama",
        {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 72, "num_hidden_layers": 8,
         "tie_word_embeddings": True},
    ),
    "qwen2, q/k/v biases, one kv head": ("qwen2", {"num_key_value_heads": 1}),
    "mistral": ("mistral", {"num_key_value_heads": 2, "sliding_window": None}),
}


@pytest.mark.parametrize(
    "case,transposed",
    [(case, True) for case in CASES] + [("llama, grouped-query attention", False), ("qwen2, q/k/v biases, one kv head", False)],
)
def test_fused_step_matches_transformers(case, transposed):
    """``transposed`` False: the weight layout used off the CPU (a GPU), checked here on the CPU."""
    kind, kw = CASES[case]
    model = _model(kind, **kw)
    decoder, why = Decoder.for_model(model, transposed=transposed)
    assert decoder is not None, why
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 320, (k,), generator=gen).tolist() for k in (9, 3, 14, 1)]
    with torch.inference_mode():
        ours, logits = prefill(model, prompts, 0, "cpu")
        theirs, _ = prefill(model, prompts, 0, "cpu")
        # A small budget: the slab has to grow (Batch._extend) on the way.
        ours, theirs = Batch.merge([(ours, None)], 3), Batch.merge([(theirs, None)], 3)
        ids = logits.argmax(-1, keepdim=True)
        worst = 0.0
        for _ in range(12):
            a = decoder.step(ids, ours)
            ours.advance()
            mask, pos = theirs.step_inputs()
            b = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=theirs.cache,
                use_cache=True,
            ).logits[:, -1]
            theirs.advance()
            worst = max(worst, float((a - b).abs().max()))
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            ids = b.argmax(-1, keepdim=True)
    assert worst < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_packed_prefill_matches_transformers(case):
    kind, kw = CASES[case]
    model = _model(kind, **kw)
    decoder, why = Decoder.for_model(model)
    assert decoder is not None, why
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 320, (k,), generator=gen).tolist() for k in (6, 1, 17, 11, 17)]
    with torch.inference_mode():
        ours, a = decoder.prefill(prompts)
        theirs, b = prefill(model, prompts, 0, "cpu")
    assert float((a - b).abs().max()) < 1e-4
    assert torch.equal(ours.mask[:, : ours.length], theirs.mask[:, : theirs.length])
    assert torch.equal(ours.pos, theirs.pos) and ours.length == theirs.length == 17
    real = theirs.mask[:, None, : theirs.length, None].bool()
    for mine, ref in zip(ours.cache.layers, theirs.cache.layers, strict=True):
        for x, y in ((mine.kbuf, ref.kbuf), (mine.vbuf, ref.vbuf)):
            x, y = x[:, :, : ours.length], y[:, :, : theirs.length]
            assert float(((x - y).abs() * real).max()) < 1e-5
            assert bool((x.masked_select(~real.expand_as(x)) == 0).all())  # padding holds zeros


def test_models_it_does_not_cover_decode_through_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    decoder, why = Decoder.for_model(gpt2)
    assert decoder is None and "gpt2" in why

    windowed = _model("qwen2", num_key_value_heads=2, use_sliding_window=True, sliding_window=16)
    decoder, why = Decoder.for_model(windowed)
    assert decoder is None and "sliding-window" in why


def test_verify_catches_a_step_that_disagrees():
    model = _model("llama", num_key_value_heads=2)
    decoder, _ = Decoder.for_model(model)
    assert decoder.verify() == ""
    decoder.layers[1].scaling *= 1.5  # a defect of the kind a new architecture would bring
    problem = decoder.verify()
    assert problem.startswith("its logits differ from transformers'")


def test_fused_weights_stay_the_models_weights():
    """q/k/v and gate/up become views of the fused tensors: a load_state_dict reaches the step."""
    model = _model("llama", num_key_value_heads=2)
    decoder, _ = Decoder.for_model(model)
    attn = model.model.layers[0].self_attn
    fused = decoder.layers[0].qkv.weight  # [in, out] on a CPU
    assert fused.shape == (64, attn.q_proj.out_features + 2 * attn.k_proj.out_features)
    assert attn.k_proj.weight.data_ptr() == fused[:, attn.q_proj.out_features :].data_ptr()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.k_proj.weight"].fill_(0.25)
    model.load_state_dict(state)
    q_rows = attn.q_proj.out_features
    k_rows = attn.k_proj.out_features
    assert bool((fused[:, q_rows : q_rows + k_rows] == 0.25).all())
    assert decoder.verify() == ""


@pytest.mark.asyncio
async def test_engine_replies_are_the_same_with_either_step(tiny_model):
    from tuneloop.engine.local import LocalEngine

    convs = [
        [{"role": "user", "content": text}]
        for text in ("hi", "What is your name?", "Do you like music? What kind?", "Good morning!")
    ]
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    texts = {}
    for fused in (True, False):
        eng = LocalEngine(str(tiny_model), version="base", max_batch=8, fused_decode=fused)
        await eng.start()
        try:
            assert eng.stats()["decode_step"] == ("fused" if fused else "transformers")
            texts[fused] = [c.text for c in await asyncio.gather(*(eng.complete(c, params) for c in convs))]
        finally:
            await eng.stop(grace=0)
    assert texts[True] == texts[False]
    assert len(set(texts[True])) > 1


@pytest.mark.parametrize("slow", ["wide", "narrow"])
def test_widen_keeps_the_thread_count_that_measured_faster(slow):
    """The choice follows measurement, both ways, and the caller's thread count is restored."""
    import time

    from tuneloop.engine._decode import _Widen

    before = torch.get_num_threads()
    narrow, wide = 1, 2
    slow_threads = wide if slow == "wide" else narrow
    seen = []

    def work(arg):
        seen.append(torch.get_num_threads())
        if torch.get_num_threads() == slow_threads:
            time.sleep(0.004)
        return arg

    widen = _Widen(narrow, wide, period=12, probes=2)
    assert [widen(1, work, i) for i in range(16)] == list(range(16))
    fast = narrow if slow == "wide" else wide
    assert seen[:4] == [narrow, wide, narrow, wide]  # a period starts with probes that alternate
    assert widen.choice == fast and set(seen[4:12]) == {fast}  # then keeps the faster
    assert seen[12:16] == [narrow, wide, narrow, wide]  # and measures again each period
    assert torch.get_num_threads() == before


def test_bfloat16_step_is_checked_against_float32():
    """Half precision: checked in float32 on a copy, then no further from float32 than transformers' own."""
    model = _model("llama", num_attention_heads=9, num_key_value_heads=3, hidden_size=72, num_hidden_layers=8,
                   tie_word_embeddings=True).to(torch.bfloat16)
    decoder, why = Decoder.for_model(model)
    assert decoder is not None, why
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # the check left the model as it was
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    decoder.layers[3].in_norm = lambda x: x  # a defect of this instance only, far above bfloat16's rounding
    problem = decoder.verify()
    assert problem.startswith("its logits differ from transformers' by") and "bfloat16 forward" in problem


def test_auto_dtype(monkeypatch):
    from tuneloop.engine.device import cpu_bf16_speedup, pick_dtype
    from tuneloop.errors import ModelError

    assert pick_dtype("auto", "cuda") == torch.bfloat16 and pick_dtype("float16", "cpu") == torch.float16
    monkeypatch.setenv("TUNELOOP_CPU_DTYPE", "bfloat16")
    assert pick_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setenv("TUNELOOP_CPU_DTYPE", "int8")
    with pytest.raises(ModelError, match="TUNELOOP_CPU_DTYPE: must be one of float32, bfloat16, float16"):
        pick_dtype("auto", "cpu")
    monkeypatch.delenv("TUNELOOP_CPU_DTYPE")
    speedup = cpu_bf16_speedup()
    assert speedup > 0
    assert pick_dtype("auto", "cpu") == (torch.bfloat16 if speedup >= 1.3 else torch.float32)


def test_half_precision_logits_rescore_the_leading_candidates_in_float32():
    """bfloat16 rounds logits to 8 bits: the leading candidates come back as float32 computes them."""
    import torch.nn.functional as F

    from tuneloop.engine._decode import RESCORE

    model = _model("llama", num_key_value_heads=2, tie_word_embeddings=True).to(torch.bfloat16)
    decoder, why = Decoder.for_model(model)
    assert decoder is not None, why
    gen = torch.Generator().manual_seed(3)
    h = (torch.randn(5, 64, generator=gen) * 3).to(torch.bfloat16)
    with torch.inference_mode():
        logits = decoder._logits(h)
        norm = model.model.norm
        x = F.rms_norm(h.float(), (64,), norm.weight.float(), norm.variance_epsilon)
        exact = F.linear(x, model.lm_head.weight.float())  # float32 arithmetic on the same weights
        rounded = model.lm_head(norm(h)).float()
    assert logits.dtype == torch.float32
    # The leaders (well inside the RESCORE candidates) are float32's, in value and in order.
    ours, theirs = logits.topk(RESCORE // 2, dim=-1), exact.topk(RESCORE // 2, dim=-1)
    assert torch.equal(ours.indices, theirs.indices)
    assert torch.allclose(ours.values, theirs.values, atol=1e-5)
    assert float((rounded.gather(-1, theirs.indices) - theirs.values).abs().max()) > 1e-4  # what it corrects
