"""A model that comes as one GGUF file, converted once into a model folder.

A GGUF file (llama.cpp's format) carries quantized weights, the model's
config and its tokenizer with the chat template. transformers reads it
through the ``gguf`` package, dequantizing every tensor to float32, which
takes tens of seconds on a CPU; the same weights saved as an ordinary model
folder (safetensors, ``config.json``, ``tokenizer.json``) load in about a
second. So a GGUF base is converted once per machine into
``$TUNELOOP_CACHE/gguf-<name>-<hash>``, keyed by the hash of the file's
content: a changed file under the same name is converted afresh, and the
same file found at another path is not converted twice.

Like the starter's build: a file lock makes a second process wait for the
first's conversion instead of repeating it, and the folder is written beside
its final place and renamed into it only when complete, so a conversion that
is killed half way leaves nothing that looks finished.

Public surface: ``ensure_gguf``, ``is_gguf``, ``file_hash``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from pathlib import Path

from tuneloop.errors import ModelError

log = logging.getLogger(__name__)

METADATA = "tuneloop.json"
KIND = "tuneloop-gguf"
#: Bump when the conversion code changes what it writes; it is part of the key.
CONVERSION_VERSION = 1
_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    try:
        with Path(path).open("rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of the file's content (hex)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _folder_name(path: Path, sha: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:60]
    return f"gguf-{stem}-{sha[:12]}-v{CONVERSION_VERSION}"


def is_complete(folder: Path, sha: str) -> bool:
    """Whether ``folder`` holds a finished conversion of the file whose hash is ``sha``."""
    try:
        meta = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        meta.get("kind") == KIND
        and meta.get("sha256") == sha
        and meta.get("conversion_version") == CONVERSION_VERSION
        and (folder / "config.json").is_file()
        and (folder / "tokenizer.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def ensure_gguf(path: str | Path, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The model folder converted from the GGUF file ``path``, converting it on first use."""
    from trainer.starter import default_cache_dir, file_lock

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"model.base: GGUF file {path} does not exist")
    if not is_gguf(path):
        raise ModelError(f"model.base: {path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    sha = file_hash(path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / _folder_name(path, sha)
    if is_complete(folder, sha):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f"{folder.name}.lock"):
        if not is_complete(folder, sha):
            convert(path, folder, sha=sha, progress=progress)
    return folder


def convert(path: Path, out_dir: Path, *, sha: str | None = None, progress: bool = True) -> Path:
    """Dequantize the GGUF file ``path`` into the model folder ``out_dir`` (replacing it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trainer.starter import install_folder

    path, out_dir = Path(path), Path(out_dir)
    sha = sha or file_hash(path)
    size_mb = path.stat().st_size / 1e6
    log.info("converting %s (%.0f MB, sha256 %s) once into %s (about a minute)...",
             path.name, size_mb, sha[:12], out_dir)
    started = time.perf_counter()
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    tmp = out_dir.parent / f".{out_dir.name}.converting-{uuid.uuid4().hex[:8]}"
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 — transformers raises many kinds for a file it cannot read
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"model.base: cannot read GGUF file {path.name}: {first}") from None
        # The dequantized weights are plain float32 now; transformers keeps a
        # quantizer marker from the load that refuses save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        meta = {
            "kind": KIND,
            "source": str(path),
            "file": path.name,
            "sha256": sha,
            "conversion_version": CONVERSION_VERSION,
            "architecture": getattr(model.config, "model_type", ""),
            "parameters": params,
            "convert_seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        install_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            hf_logging.enable_progress_bar()
    log.info("converted %s: %.1f M parameters (%s) in %.0f s -> %s", path.name, params / 1e6,
             meta["architecture"], time.perf_counter() - started, out_dir)
    return out_dir
