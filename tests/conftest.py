"""Shared fixtures: a tiny model built in seconds, a fresh config and store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach for a hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny GPT built by the starter recipe with tiny sizes (seconds on CPU)."""
    from trainer.starter import TINY, build_model

    out = tmp_path_factory.mktemp("tiny-model")
    return build_model(out / "model", TINY, progress=False)
