"""The decoding step in C (``decode_step.c``) against the torch step it stands in for, on every architecture."""

from __future__ import annotations

import pytest
import torch

from tests.test_decode import CASES, _model
from tests.test_quant import _exact_in_int4
from tuneloop.engine import _int4
from tuneloop.engine._batch import Batch
from tuneloop.engine._decode import QUANT_TOLERANCE, Decoder

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(_int4.library() is None, reason=f"our int4 kernel: {_int4.unavailable()}")]


def _activations() -> list[str]:
    return ["float", "int16"] if hasattr(_int4.library(), "int4_mm_q") else ["float"]


def _run(decoder: Decoder, native: bool, steps: int = 4):
    """A ragged prefill and ``steps`` greedy steps; the steps' logits and the cache afterwards."""
    saved = decoder.native
    if not native:
        decoder.native = None
    try:
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 320, (k,), generator=gen).tolist() for k in (5, 2, 9)]
        with torch.inference_mode():
            batch, logits = decoder.prefill(prompts)
            batch = Batch.merge([(batch, None)], steps + 1)
            out = []
            ids = logits.argmax(-1, keepdim=True)
            for _ in range(steps):
                logits = decoder.step(ids, batch)
                batch.advance()
                out.append(logits)
                ids = logits.argmax(-1, keepdim=True)
        return torch.stack(out), batch
    finally:
        decoder.native = saved


@pytest.mark.parametrize("activations", _activations())
@pytest.mark.parametrize("case", list(CASES))
def test_the_c_step_computes_what_the_torch_step_does(case, activations, monkeypatch):
    monkeypatch.setenv("TUNELOOP_INT4_ACTIVATIONS", activations)
    kind, kw = CASES[case]
    model = _model(kind, **kw)
    if model.config.hidden_size % 32 or model.config.intermediate_size % 32:
        pytest.skip("int4 needs widths divisible by 32")
    _exact_in_int4(model)  # weights int4 holds: the check at load compares arithmetic, not rounding
    decoder, why = Decoder.for_model(model, quantize="int4", quant_rows=16)
    assert decoder is not None and decoder.native is not None, why
    assert "(in C)" in why
    ours, ours_batch = _run(decoder, native=True)
    theirs, theirs_batch = _run(decoder, native=False)
    scale = float(theirs.abs().max())
    # float32 activations: the same products and sums in another order; int16: each side rounds its own
    # (slightly different) inputs to 16 bits, which moves a logit by far less than the weights' int4 does
    # (and the output projection's 8-bit ranking product, outside the candidates float32 scores again, more).
    tol = 1e-5 if activations == "float" else 2e-3
    lead = theirs.topk(8, dim=-1).indices  # scored again in float32 (``Decoder._logits``)
    assert float((ours.gather(-1, lead) - theirs.gather(-1, lead)).abs().max()) <= tol * scale
    assert float((ours - theirs).abs().max()) <= (tol if activations == "float" else QUANT_TOLERANCE["int4"]) * scale
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert ours_batch.length == theirs_batch.length
    for a, b in zip(ours_batch.cache.layers, theirs_batch.cache.layers, strict=True):
        assert a.length == b.length and a.keys.shape == b.keys.shape
        assert float((a.keys - b.keys).abs().max()) <= tol * max(1.0, float(b.keys.abs().max()))
        assert float((a.values - b.values).abs().max()) <= tol * max(1.0, float(b.values.abs().max()))


def test_the_c_step_serves_only_what_it_covers(monkeypatch):
    model = _model("llama", num_key_value_heads=2)
    decoder, _ = Decoder.for_model(model, quantize="none")
    assert decoder.native is None and decoder.native_why == "dense weights"
    monkeypatch.setenv("TUNELOOP_NATIVE_STEP", "0")
    decoder, why = Decoder.for_model(_model("llama", num_key_value_heads=2), quantize="int4", quant_rows=4)
    assert decoder.native is None and "in torch (TUNELOOP_NATIVE_STEP=0)" in why
    monkeypatch.delenv("TUNELOOP_NATIVE_STEP")
    decoder, _ = Decoder.for_model(_model("llama", num_key_value_heads=2), quantize="int4", quant_rows=4)
    assert decoder.native is not None and decoder.native.rows == 4
    with decoder.dense():  # quantized weights switched off: so is the C step
        assert decoder.native.rows == 0
    # A cache the C step cannot read (not contiguous) is left to the torch step, which still answers.
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        batch, logits = decoder.prefill([torch.randint(0, 320, (k,), generator=gen).tolist() for k in (6, 4)])
        batch = Batch.merge([(batch, None)], 3)
        # On a cache it reads, the C step serves the step (not the torch step behind it) and writes a column.
        ids = logits.argmax(-1, keepdim=True)
        h = decoder.embed(ids.view(2))
        cos, sin = decoder._rope(h, batch.step_inputs()[1])
        assert decoder.native.step(h, cos, sin, batch)
        assert all(c.length == batch.length + 1 for c in batch.cache.layers)
        batch.advance()
        layer = batch.cache.layers[0]
        layer.kbuf = layer.kbuf.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
        assert not layer.kbuf.is_contiguous()
        h = torch.zeros(2, 64)
        assert not decoder.native.step(h, torch.zeros(2, 1, 16), torch.zeros(2, 1, 16), batch)
        assert batch.cache.layers[0].length == batch.length  # nothing written
        assert torch.isfinite(decoder.step(logits.argmax(-1, keepdim=True), batch)).all()
