"""Model versions on disk, and which one is live.

The registry knows folders and JSON; it knows nothing of training or serving.
Layout under ``[trainer] registry``::

    LIVE              one line: the live version id, or "base" (absent: base)
    history.jsonl     every promote / rollback, appended
    train.lock        held (fcntl) by the one running training process
    v1/               a version: adapter/ (a peft LoRA folder, or a full model
                      folder when trained without LoRA), meta.json, report.json
    .staging/run-N/   a run's work area; a version folder is built here and
                      renamed into place whole
    communities/slack+T0123/
                      a community's own line ([trainer] scope = "community"):
                      LIVE, history.jsonl and versions as above, numbered
                      apart; ``:`` in the key is written ``+`` (never in a key)

Lines. Under scope = "community" each community has its line; ``local``'s is
the top folder, where every version from before communities learned apart
already is (they trained on what is now local's data). Under scope =
"global" the top folder is the one line, trained on every community. A
version is served under its *adapter name*: its id on the top line (``v3``),
``COMMUNITY/ID`` on a community's (``slack:T0123/v3``), unique across lines.
One run at a time over all lines: ``train.lock``, the work areas and the
run logs are the top folder's.

Atomicity. A version folder appears by one ``rename`` of a complete folder,
so no reader sees half a version. The live version is the content of
``LIVE``, replaced with ``os.replace`` after an fsync; a crash at any moment
leaves either the old or the new pointer, each naming a complete version, so
there is always exactly one live version and a loadable model. Only the
main process of a run, and admins' promote / rollback, write here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneloop import community as communities
from tuneloop.errors import InputError, NotFoundError, TrainingError

log = logging.getLogger(__name__)

BASE = "base"
LIVE = "LIVE"
META = "meta.json"
REPORT = "report.json"
ADAPTER = "adapter"
#: the run community of the global line (scope = "global")
GLOBAL = "*"
COMMUNITIES = "communities"
_VERSION_RE = re.compile(r"^v(\d+)$")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunLock:
    """The one-run-at-a-time lock: an fcntl lock the kernel drops when its process dies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now (a probe; takes nothing)."""
        if self._fd is not None:
            return False
        if not self.acquire():
            return True
        self.release()
        return False


class Registry:
    """One line of versions. Cheap to create; every call reads the disk afresh.

    ``Registry(root)`` is the top line; ``Registry.line(root, community)`` a
    community's (``community`` is None for the top line, whoever uses it).
    """

    def __init__(self, root: str | Path, *, community: str | None = None, top: str | Path | None = None):
        self.root = Path(root)
        #: the registry folder every line shares (lock, work areas, logs)
        self.top = Path(top) if top is not None else self.root
        self.community = community

    @classmethod
    def line(cls, root: str | Path, community: str | None) -> Registry:
        """``community``'s line under the registry folder ``root`` (None, ``local``, ``*``: the top line)."""
        if community in (None, communities.LOCAL, GLOBAL):
            return cls(root, community=community)
        communities.check(community)
        return cls(Path(root) / COMMUNITIES / community.replace(":", "+"), community=community, top=root)

    def lines(self) -> dict[str, Registry]:
        """Every community line that exists under this registry folder, by community key."""
        folder = self.top / COMMUNITIES
        if not folder.is_dir():
            return {}
        out = {}
        for p in sorted(folder.iterdir()):
            key = p.name.replace("+", ":")
            try:
                out[key] = Registry.line(self.top, key)
            except InputError:
                continue  # not a folder of ours
        return out

    def adapter_name(self, version: str | None) -> str | None:
        """The name ``version`` is served under (None: the base model)."""
        if version is None:
            return None
        return version if self.root == self.top else f"{self.community}/{version}"

    # -- reading ----------------------------------------------------------------

    def lock(self) -> RunLock:
        return RunLock(self.top / "train.lock")

    def live(self) -> str | None:
        """The live version id; ``None`` when the base model is live."""
        try:
            text = (self.root / LIVE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return None if text in ("", BASE) else text

    def path(self, version: str) -> Path:
        if not _VERSION_RE.match(version or ""):
            raise NotFoundError(f"version {version!r} not found (versions look like v1, v2, ...)")
        folder = self.root / version
        if not (folder / META).is_file():
            raise NotFoundError(f"version {version} not found in {self.root}")
        return folder

    def adapter(self, version: str | None) -> Path | None:
        """The adapter folder that serves ``version`` (``None``: the base model)."""
        return None if version is None else self.path(version) / ADAPTER

    def base_mismatch(self, version: str | None, model_path: str | None) -> str | None:
        """Why ``version`` must not be served on ``model_path`` (a different base), or None."""
        if version is None or not model_path:
            return None
        trained_on = self.meta(version).get("base_path")
        if trained_on and Path(trained_on).resolve() != Path(model_path).resolve():
            return f"{version} was trained on {trained_on}, the engine serves {model_path}"
        return None

    def meta(self, version: str) -> dict[str, Any]:
        return json.loads((self.path(version) / META).read_text(encoding="utf-8"))

    def report(self, version: str) -> dict[str, Any]:
        try:
            return json.loads((self.path(version) / REPORT).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in self.root.iterdir()
                 if (m := _VERSION_RE.match(p.name)) and (p / META).is_file()]
        return [name for _, name in sorted(found)]

    def list(self) -> list[dict[str, Any]]:
        """Every version's metadata, oldest first, with ``live`` set on the live one."""
        live = self.live()
        out = []
        for v in self.versions():
            meta = self.meta(v)
            meta["live"] = v == live
            out.append(meta)
        return out

    # -- writing ------------------------------------------------------------------

    def staging(self, run: str, *, create: bool = True) -> Path:
        folder = self.top / ".staging" / run
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        return folder

    def clean_staging(self, keep: str | None = None) -> None:
        """Remove work areas of earlier runs (a run killed mid-way leaves one)."""
        base = self.top / ".staging"
        if base.is_dir():
            for p in base.iterdir():
                if p.name != keep:
                    shutil.rmtree(p, ignore_errors=True)

    def add(self, folder: Path, meta: dict[str, Any], report: dict[str, Any]) -> str:
        """Move a finished ``folder`` (holding ``adapter/``) into place as the next version.

        Writes ``meta.json`` (with ``version`` and ``created_at`` filled in) and
        ``report.json`` first, then renames the folder: all or nothing.
        """
        if not (folder / ADAPTER).is_dir():
            raise TrainingError(f"{folder}: no adapter to register")
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            existing = [int(_VERSION_RE.match(v).group(1)) for v in self.versions()]
            taken = {int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION_RE.match(p.name))}
            n = max([0, *existing, *taken]) + 1
            version = f"v{n}"
            meta = {**meta, "version": version, "created_at": meta.get("created_at", time.time())}
            (folder / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            (folder / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
            try:
                os.rename(folder, self.root / version)
            except OSError:
                continue  # someone took that number between the scan and the rename
            _fsync_dir(self.root)
            return version
        raise TrainingError(f"{self.root}: cannot allocate a version folder")

    def set_live(self, version: str | None, *, action: str, by: str = "") -> dict[str, Any]:
        """Point ``LIVE`` at ``version`` (``None``: the base model); atomic."""
        if version is not None:
            self.adapter_must_load(version)
        previous = self.live()
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.root / LIVE, (version or BASE) + "\n")
        entry = {"time": time.time(), "action": action, "from": previous or BASE, "to": version or BASE,
                 "by": by}
        with (self.root / "history.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("live version: %s -> %s (%s%s)", previous or BASE, version or BASE, action,
                 f" by {by}" if by else "")
        return entry

    def adapter_must_load(self, version: str) -> None:
        folder = self.path(version) / ADAPTER
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise TrainingError(f"version {version}: adapter folder {folder} holds no weights")

    def promote(self, version: str, by: str = "") -> dict[str, Any]:
        if version == BASE:
            return self.set_live(None, action="promote", by=by)
        self.path(version)
        return self.set_live(version, action="promote", by=by)

    def rollback(self, version: str | None = None, by: str = "") -> dict[str, Any]:
        """Go back to ``version``, by default the live version's parent (the base model has none)."""
        if version is None:
            live = self.live()
            if live is None:
                raise InputError("the base model is live; there is nothing to roll back to")
            target = self.meta(live).get("parent")
        else:
            target = None if version == BASE else version
        if target is not None:
            self.path(target)
        return self.set_live(target, action="rollback", by=by)


@contextlib.contextmanager
def held(lock: RunLock) -> Iterator[None]:
    if not lock.acquire():
        raise TrainingError("another training run is going; try again when it has finished")
    try:
        yield
    finally:
        lock.release()
