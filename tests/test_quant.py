"""Weight-only int8/int4 weights for the fused step: layout, closeness to float32, LoRA beside them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tuneloop.engine import _int4
from tuneloop.engine.base import SamplingParams
from tuneloop.engine.quant import GROUP, QuantizedWeight
from tuneloop.errors import ModelError

pytestmark = pytest.mark.timeout(120)


def test_int4_codes_are_a_q4_1_files_own_blocks():
    """Weights dequantized from GGUF Q4_1 blocks (what the conversion stores) give back the file's codes."""
    import gguf

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
    blocks = raw.reshape(64, 128 // GROUP, -1)
    qs = blocks[..., 4:]  # after the float16 scale and minimum: 16 bytes, low nibbles first
    file_codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(64, 128).astype(np.int32)

    q = QuantizedWeight(torch.from_numpy(deq), "int4")
    assert torch.equal(q.codes, torch.from_numpy(file_codes))
    err = float((q.dequantized() - torch.from_numpy(deq)).abs().max())
    if q._lib is not None:
        # Ours holds the file's float16 scales and minimums themselves: its weights are the file's.
        assert q._sm.dtype == torch.float16 and err <= 1e-6 * float(np.abs(deq).max())
    else:
        # torch's: the file's but for bfloat16 scales and zero points.
        assert err <= 2**-8 * float(np.abs(deq).max())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_kernels_multiply_by_the_weights_they_hold(kind):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen) * 0.1
    x = torch.randn(3, 64, generator=gen)
    q = QuantizedWeight(w, kind, rows=4)
    ours = q._lib is not None
    want = (x if ours else x.bfloat16().float()) @ q.dequantized().t()
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (3, 96)
    # ours: exact float32 activations, or rounded to 16 bits per group of 32; torch's: to bfloat16
    tol = {"float": 1e-5, "int16": 2e-4}[q.activations] if ours else 0.01
    assert float((got - want).abs().max()) <= tol * float(want.abs().max())
    # and the quantized weight is near the original (a wrong layout would not be)
    err = float((q.dequantized() - w).abs().max()) / float(w.abs().max())
    assert err < (0.01 if kind == "int8" else 0.1)


needs_kernel = pytest.mark.skipif(_int4.library() is None, reason=f"our int4 kernel: {_int4.unavailable()}")


def _rounded_product(x: torch.Tensor, codes, scale, minimum, qmax: int) -> torch.Tensor:
    """What the integer kernel computes, in float64: each row's groups of 32 rounded to integers of at most
    ``qmax`` (float32 arithmetic, half to even, as the kernel rounds), times the codes, scaled; the minimums
    times the exact group sums."""
    out, width = codes.shape
    xg = x.view(x.shape[0], width // GROUP, GROUP)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(float(qmax)) / amax, torch.zeros_like(amax))
    q = torch.round(xg * inv).double()  # [M, groups, 32]
    d = (amax / qmax).double()
    c = codes.view(out, width // GROUP, GROUP).double()
    dots = torch.einsum("mgi,ogi->mog", q, c)  # [M, out, groups]
    sums = xg.double().sum(-1)  # [M, groups]
    return (dots * scale.double()[None] * d.squeeze(-1)[:, None] + minimum.double()[None] * sums[:, None]).sum(-1)


@pytest.mark.parametrize("isa", list(_int4.BUILDS))
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("activations", ["float", "int16", "int8"])
def test_our_int4_kernel_is_the_product_with_the_dequantized_weights(activations, half, isa):
    """Each instruction set's build and each form of activations it has: random shapes (odd output counts,
    widths in multiples of 32), 1-16 rows and a row of zeros, 1 and 2 threads; float32 activations against
    the float64 product, rounded ones against the float64 product of the same rounding."""
    from tuneloop.engine.quant import int4_codes

    lib, why = _int4.build(isa)
    if lib is None:
        pytest.skip(f"our int4 kernel for {isa}: {why}")
    if activations != "float" and not hasattr(lib, "int4_mm_q"):
        pytest.skip(f"no integer-activation kernel in the {isa} build")
    pack = _int4.pack if activations == "float" else _int4.pack_q
    gen = torch.Generator().manual_seed(1)
    for out, width in [(1, 32), (17, 64), (96, 128), (333, 576), (48, 1536)]:
        codes, scale, minimum = int4_codes(torch.randn(out, width, generator=gen) * 0.05)
        if half:
            scale, minimum = scale.half().float(), minimum.half().float()
        packed, sm = pack(codes, scale, minimum, half)
        got_codes, got_scale, got_min = _int4.unpack(packed, sm, out, width)  # the layout, read back
        assert torch.equal(got_codes, codes) and torch.equal(got_scale, scale) and torch.equal(got_min, minimum)
        w = (codes.view(out, -1, GROUP).double() * scale.double()[..., None] + minimum.double()[..., None])
        w = w.view(out, width)
        for rows in (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 70):
            x = torch.randn(rows, width, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
            zero = rows // 2 if rows > 1 else None
            if zero is not None:
                x[zero] = 0  # a row of zeros: nothing to scale by
            if activations == "float":
                want = x.double() @ w.t()
            else:
                want = _rounded_product(x, codes, scale, minimum, 32639 if activations == "int16" else 127)
            for threads in (1, 2):
                got = _int4.matmul(lib, x, packed, sm, out, threads, activations)
                assert got.dtype == torch.float32 and got.shape == (rows, out)
                err = float((got.double() - want).abs().max()) / float(want.abs().max())
                # float32 sums either way; rounded inputs add float32 products of scales (a layout or
                # rounding mistake is off by the whole size)
                assert err <= (1e-5 if activations == "float" else 1e-4), (out, width, rows, threads, err)
                if zero is not None:
                    assert float(got[zero].abs().max()) <= 1e-6


@pytest.mark.parametrize("isa", list(_int4.BUILDS))
def test_top_rescore_keeps_each_rows_largest_and_scores_them_exactly(isa):
    """The C pass against torch's topk, gather and product: the same candidates and float32 scores, the rest
    of each row untouched; rows in increasing order (every logit beats the kept ones) and fewer logits
    than candidates."""
    lib, why = _int4.build(isa)
    if lib is None:
        pytest.skip(f"our int4 kernel for {isa}: {why}")
    gen = torch.Generator().manual_seed(2)
    for rows, vocab, width, k in [(1, 1000, 64, 64), (5, 4099, 96, 64), (16, 20000, 576, 64), (3, 40, 32, 64),
                                  (2, 300, 32, 7)]:
        weight = torch.randn(vocab, width, generator=gen) * 0.05
        x = torch.randn(rows, width, generator=gen)
        logits = torch.randn(rows, vocab, generator=gen)
        logits[-1] = torch.arange(vocab, dtype=torch.float32)  # ascending: a new largest at every logit
        want = logits.clone()
        top = want.topk(min(k, vocab), dim=-1).indices
        want.scatter_(-1, top, (weight[top] @ x.unsqueeze(-1)).squeeze(-1))
        got = logits.clone()
        picked = _int4.top_rescore(lib, got, k, weight, x)
        assert picked.shape == top.shape
        assert torch.equal(picked.sort(-1).values, top.sort(-1).values), (rows, vocab, k)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_int4_weights_use_our_kernel_and_say_so(caplog):
    import logging

    _int4.library.cache_clear()  # logs again on its next call
    with caplog.at_level(logging.INFO, logger="tuneloop.engine._int4"):
        q = QuantizedWeight(torch.randn(40, 64), "int4", rows=4)
    lib = _int4.library()
    assert f"our kernel (int4_kernel.c, {lib.isa}, {_int4.activations(lib)} activations)" in caplog.text
    assert q.backend == {"float": "float32 kernel", "int16": "int16 kernel", "int8": "int8 kernel"}[q.activations]
    assert q._sm.dtype == torch.float32  # random scales: not float16's
    assert q.raw(torch.randn(2, 64)).dtype == torch.float32
    assert q(torch.randn(2, 64).bfloat16()).dtype == torch.bfloat16
    padded = 48 if q.activations == "float" else 40  # outputs in blocks of 16 (float) or 8 (integer kernel)
    assert q.nbytes == padded * 64 // 2 + padded * 2 * 2 * 4  # scales and minimums in float32


def test_without_our_kernel_int4_weights_use_torchs(monkeypatch, tmp_path, caplog):
    """TUNELOOP_INT4_KERNEL=torch, or a compile that fails: one log line, torch's kernel, same answers."""
    import logging

    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=gen) * 0.1, torch.randn(3, 64, generator=gen)
    try:
        for setting in ("env", "compiler"):
            _int4._load.cache_clear()
            _int4.build.cache_clear()
            _int4.library.cache_clear()
            if setting == "env":
                monkeypatch.setenv("TUNELOOP_INT4_KERNEL", "torch")
            else:
                monkeypatch.delenv("TUNELOOP_INT4_KERNEL", raising=False)
                monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path))  # nothing compiled there yet
                monkeypatch.setattr(_int4, "_compiler", lambda: "/bin/false")
            with caplog.at_level(logging.INFO, logger="tuneloop.engine._int4"):
                q = QuantizedWeight(w, "int4", rows=4)
            assert q.backend == "torch bfloat16 kernel"
            assert "torch's bfloat16 kernel" in caplog.text
            if setting == "env":
                assert "TUNELOOP_INT4_KERNEL=torch" in caplog.text
            caplog.clear()
            want = x.bfloat16().float() @ q.dequantized().t()
            assert float((q(x) - want).abs().max()) <= 0.01 * float(want.abs().max())
            assert q.raw(x).dtype == torch.bfloat16
    finally:
        monkeypatch.undo()
        _int4._load.cache_clear()
        _int4.build.cache_clear()
        _int4.library.cache_clear()


def test_unsupported_shapes_and_devices_are_one_line_errors():
    with pytest.raises(ModelError, match="divisible by 32"):
        QuantizedWeight(torch.randn(8, 40), "int4")
    with pytest.raises(ModelError, match="must be one of"):
        QuantizedWeight(torch.randn(8, 64), "int3")
    from tuneloop.engine.quant import pick_format

    with pytest.raises(ModelError, match="CPU only"):
        pick_format("int4", "cuda", 64, torch.bfloat16)
    assert pick_format("auto", "cuda", 64, torch.bfloat16)[0] == "none"
    assert pick_format("auto", "cpu", 40, torch.float32)[0] == "none"  # width not a multiple of 32


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_steps_stay_close_to_float32(tiny, kind):
    import copy

    from tuneloop.engine._decode import QUANT_TOLERANCE, Decoder

    model = copy.deepcopy(tiny)
    decoder, why = Decoder.for_model(model, quantize=kind, quant_rows=16)
    assert decoder is not None and decoder.quantize == kind, why
    err, flips = decoder._quantized_distance(tiny)
    assert 0 < err <= QUANT_TOLERANCE[kind] and flips == 0
    with torch.inference_mode(), decoder.dense():
        dense_err, _ = decoder._quantized_distance(tiny)
    assert dense_err < 1e-3  # the dense path is float32's own


def test_a_wrong_scale_is_caught_at_load(tiny):
    import copy

    from tuneloop.engine._decode import Decoder

    decoder, _ = Decoder.for_model(copy.deepcopy(tiny))
    decoder.quantize_weights("int4", 16)
    for layer in decoder.layers:
        quant = layer.gate_up.quant  # every scale four times too large
        if quant._lib is not None:
            quant._sm[:, :, 0] *= 4
        else:
            quant._sz[..., 0] *= 4
    assert "int4 weights" in decoder.verify()
    decoder, why = Decoder.for_model(copy.deepcopy(tiny), quantize="int4", quant_rows=16)
    assert decoder.quantize == "int4" and "int4 weights for steps" in why


def _exact_in_int4(model) -> None:
    """Round the model's projections to weights int4 holds exactly, as a GGUF Q4 file's are.

    Each group of 32 inputs gets a power-of-two scale, codes 0 and 15 on its
    first two weights and its zero point at 0, all exact in bfloat16:
    quantizing then changes nothing, and the quantized and float32 models
    differ only by the kernel's arithmetic: the order of float32 sums in
    ours, the activations' rounding to bfloat16 in torch's (the output
    projection's int4 only picks candidates that float32 rescores).
    """
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                out, width = mod.weight.shape
                groups = mod.weight.view(out, width // GROUP, GROUP)
                scale = torch.exp2(torch.ceil(torch.log2(groups.abs().amax(-1, keepdim=True) / 7)))
                codes = (torch.round(groups / scale) + 8).clamp(0, 15)
                codes[..., 0], codes[..., 1] = 0, 15
                mod.weight.copy_(((codes - 8) * scale).view(out, width))


@pytest.fixture(scope="module")
def exact_folder(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("int4-exact") / "model"
    shutil.copytree(tiny_model, folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    _exact_in_int4(model)
    model.save_pretrained(str(folder))
    return folder


def _adapter(folder, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    lora.save_pretrained(str(out))
    return out


PROMPTS = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "What is your name?"}],
           [{"role": "user", "content": "Do you like music?"}]]


async def _replies(engine, n=12):
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    return [(await engine.complete(c, params)).text for c in PROMPTS]


@pytest.mark.asyncio
async def test_lora_beside_quantized_weights_answers_as_the_merged_float32_model(exact_folder, tmp_path):
    """Swapping in a LoRA version over int4 weights: the merged float32 model's greedy replies, nothing rebuilt."""
    from tuneloop.engine.local import LocalEngine

    adapter = _adapter(exact_folder, tmp_path / "adapter")
    merged_folder = tmp_path / "merged"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(exact_folder), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(str(merged_folder))
    shutil.copy(exact_folder / "tokenizer.json", merged_folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (exact_folder / name).exists():
            shutil.copy(exact_folder / name, merged_folder)

    reference = {}
    for key, folder in (("base", exact_folder), ("merged", merged_folder)):
        eng = LocalEngine(str(folder), version=key, dtype="float32", quantize="none")
        await eng.start()
        reference[key] = await _replies(eng)
        await eng.stop(grace=0)
    assert reference["base"] != reference["merged"]  # the adapter changes the replies

    eng = LocalEngine(str(exact_folder), version="base", dtype="float32", quantize="int4")
    await eng.start()
    try:
        runner = eng.runner
        assert runner.quantize == "int4" and runner.decoder.quantize == "int4"
        decoder = runner.decoder
        assert await _replies(eng) == reference["base"]
        await eng.swap_adapter(str(adapter), "v1")
        assert runner.decoder is decoder  # the quantized base was kept, not rebuilt
        assert eng.model_version == "v1"
        assert await _replies(eng) == reference["merged"]
        await eng.swap_adapter(None, "base")
        assert await _replies(eng) == reference["base"]
    finally:
        await eng.stop(grace=0)


@pytest.mark.asyncio
async def test_a_version_that_cannot_sit_beside_the_weights_is_merged_and_served_dense(exact_folder, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneloop.engine.local import LocalEngine

    model = AutoModelForCausalLM.from_pretrained(str(exact_folder), dtype=torch.float32)
    dora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(str(tmp_path / "dora"))
    eng = LocalEngine(str(exact_folder), version="base", dtype="float32", quantize="int4")
    await eng.start()
    try:
        await eng.swap_adapter(str(tmp_path / "dora"), "v-dora")
        assert eng.runner.decoder.quantize == "none" and eng.model_version == "v-dora"
        await eng.swap_adapter(None, "base")
        assert eng.runner.decoder.quantize == "int4"
        assert len(await _replies(eng, 4)) == 3
    finally:
        await eng.stop(grace=0)


def test_large_steps_of_a_float32_model_read_a_bfloat16_copy(tiny):
    import copy

    from tuneloop.engine._decode import Decoder

    decoder, why = Decoder.for_model(copy.deepcopy(tiny), quantize="int4", quant_rows=2, half=True)
    assert decoder.half and "a bfloat16 copy above" in why
    x = torch.randn(3, decoder.layers[0].qkv.out_in.shape[1])
    f = decoder.layers[0].qkv
    assert f(x[:2]).dtype == torch.float32  # two rows: int4
    want = torch.nn.functional.linear(x.bfloat16(), f.half).float()
    assert torch.equal(f(x), want)  # three rows: the bfloat16 copy
    assert not torch.equal(f(x[:2]), want[:2])
    with decoder.dense():
        assert torch.allclose(f(x), x @ f.out_in.t(), atol=1e-5)  # the model's own float32 weights
    assert f.half is not None and f.quant.rows == 2  # restored
    err, flips = decoder._quantized_distance(tiny)
    assert err < 0.1 and flips == 0


def test_the_kernel_builds_for_avx2_where_the_cpu_lacks_avx512(monkeypatch, tmp_path, caplog):
    """A CPU with AVX2 but no AVX-512 gets our kernel's AVX2 build (not torch's), and the log line says so."""
    import logging

    if not _int4.build("avx2")[0]:
        pytest.skip(f"our int4 kernel for avx2: {_int4.build('avx2')[1]}")
    try:
        _int4._load.cache_clear()
        _int4.build.cache_clear()
        _int4.library.cache_clear()
        monkeypatch.delenv("TUNELOOP_INT4_KERNEL", raising=False)
        monkeypatch.delenv("TUNELOOP_INT4_ACTIVATIONS", raising=False)
        monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path))
        monkeypatch.setattr(_int4, "_cpu_flags", lambda: {"avx", "avx2", "fma", "f16c", "sse3"})
        with caplog.at_level(logging.INFO, logger="tuneloop.engine._int4"):
            q = QuantizedWeight(torch.randn(40, 64), "int4", rows=4)
        # AVX2's default: the integer-activation kernel, inputs rounded to 16 bits (docs/benchmarks.md)
        assert q.backend == "int16 kernel" and "avx2, int16 activations" in caplog.text
        assert list((tmp_path / "kernels").glob("int4_kernel-avx2-*.so"))
    finally:
        monkeypatch.undo()
        _int4._load.cache_clear()
        _int4.build.cache_clear()
        _int4.library.cache_clear()


@needs_kernel
def test_activations_follow_the_build_and_the_environment(monkeypatch):
    lib = _int4.library()
    w = torch.randn(40, 64)
    monkeypatch.delenv("TUNELOOP_INT4_ACTIVATIONS", raising=False)
    assert QuantizedWeight(w, "int4").activations == _int4.ACTIVATIONS[lib.isa]
    integer = hasattr(lib, "int4_mm_q")
    for asked in ("float", "int16", "int8", "bogus"):
        monkeypatch.setenv("TUNELOOP_INT4_ACTIVATIONS", asked)
        want = _int4.ACTIVATIONS[lib.isa] if asked == "bogus" else asked
        q = QuantizedWeight(w, "int4")
        assert q.activations == (want if integer else "float")
        # a caller's choice (the output projection's 8 bits) holds where the build rounds at all
        assert QuantizedWeight(w, "int4", activations="int8").activations == (
            "int8" if integer and q.activations != "float" else q.activations)
