"""Where the base model comes from: the offline starter, a local folder or a hub id.

This module only resolves a name to a folder ``from_pretrained`` can load;
the engine and the trainer do the loading. The serving process resolves the
base here and hands the engine a folder, so the engine never imports the
trainer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tuneloop.errors import ModelError

log = logging.getLogger(__name__)

STARTER = "starter"


def resolve_base(base: str, progress: bool = True) -> str:
    """A path (or hub id already in the local cache) that ``from_pretrained`` loads.

    ``"starter"`` builds the offline starter once per machine. A hub id that
    cannot be downloaded fails with one line that names the starter.
    """
    if base == STARTER:
        from trainer.starter import ensure_starter

        return str(ensure_starter(progress=progress))
    local = Path(base).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelError(f"model.base: {local} is not a Hugging Face model folder (no config.json)")
        return str(local)
    try:
        from huggingface_hub import snapshot_download

        # Download on first use; later starts find it in the hub cache.
        return snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                       "*.jinja", "tokenizer*"])
    except Exception as e:  # noqa: BLE001 — any failure here means "cannot get the model"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "offline mode (HF_HUB_OFFLINE=1)" if offline else type(e).__name__
        raise ModelError(
            f"model.base: cannot download {base!r} ({why}); set model.base = \"starter\" "
            f"to use the offline starter model") from None
