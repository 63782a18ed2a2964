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
def tiny_model() -> Path:
    """A tiny GPT built by the starter recipe with tiny sizes.

    Built once per machine into the tuneloop cache, keyed by its recipe like
    the starter itself, so test runs (and parallel runs) share one build.
    Read-only: a test that changes weights copies the folder first.
    """
    from trainer.starter import TINY, ensure_starter

    return ensure_starter(recipe=TINY, progress=False)
