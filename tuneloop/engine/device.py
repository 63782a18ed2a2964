"""Which device and dtype a model runs on: ``[model] device`` and ``dtype`` made concrete."""

from __future__ import annotations

from tuneloop.errors import ModelError


def pick_device(device: str) -> str:
    """``auto`` means CUDA when present, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device: {device!r} asked for but no CUDA device is available")
    return device


def pick_dtype(dtype: str, device: str):
    """``auto`` means bfloat16 on CUDA, float32 elsewhere (CPU bf16 is slow)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
