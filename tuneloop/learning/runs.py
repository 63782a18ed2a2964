"""Training-run records in the store (``training_runs``): queued, running, done, failed or cancelled.

The launcher writes ``queued`` with the pid of the process it started; that
process writes ``running`` and its stages, then ``done`` (with the version and
whether it went live) or ``failed``. A run killed mid-way cannot say so: a
``running`` row whose process no longer holds the run lock, or a ``queued`` row
whose process is gone, is marked ``failed`` ("interrupted") by whoever looks
next. A run the server started and stopped with itself (Ctrl-C) is
``cancelled``. No torch here: the CLI's ``models`` and ``status`` stay fast.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tuneloop.community import LOCAL
from tuneloop.store import ACTIVE_RUN, RUN_STATUSES, Store

ACTIVE = ACTIVE_RUN
FINISHED = tuple(s for s in RUN_STATUSES if s not in ACTIVE_RUN)


def run_name(run_id: int) -> str:
    return f"run-{run_id}"


def parse_run(text: str | int) -> int:
    s = str(text)
    return int(s[4:] if s.startswith("run-") else s)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a child the launcher has not reaped yet is dead too
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Runs:
    def __init__(self, store: Store):
        self.store = store

    def create(self, reason: str, pid: int | None = None, community: str = LOCAL) -> int:
        """A queued run of ``community``'s line (``registry.GLOBAL``: the global line)."""
        return self.store.add_training_run(reason, pid, community)

    def update(self, run_id: int, **fields: Any) -> None:
        if "metrics" in fields and not isinstance(fields["metrics"], (str, type(None))):
            fields["metrics"] = json.dumps(fields["metrics"])
        if "promoted" in fields and fields["promoted"] is not None:
            fields["promoted"] = int(bool(fields["promoted"]))
        self.store.update_training_run(run_id, **fields)

    def get(self, run_id: int) -> dict[str, Any]:
        return _row(self.store.training_run(run_id))

    def latest(self, statuses: tuple[str, ...] = RUN_STATUSES, community: str | None = None
               ) -> dict[str, Any] | None:
        """The newest run of ``statuses`` (of ``community``'s line when given)."""
        rows = self.store.training_runs(statuses, newest_first=True, limit=1, community=community)
        return _row(rows[0]) if rows else None

    def last_done(self, community: str | None = None) -> dict[str, Any] | None:
        return self.latest(("done",), community)

    def last_finished(self, community: str | None = None) -> dict[str, Any] | None:
        """The newest run that ended, whichever way."""
        return self.latest(FINISHED, community)

    def active(self) -> list[dict[str, Any]]:
        return [_row(r) for r in self.store.training_runs(ACTIVE)]

    def end(self, run_id: int, status: str, error: str) -> bool:
        """Mark a run still going ``failed`` or ``cancelled``; False when it had already ended."""
        return self.store.end_active_training_run(run_id, status, error)

    def reap(self, lock_held: bool, keep: int | None = None) -> None:
        """Mark runs whose process died without saying so as failed."""
        for r in self.active():
            if r["id"] == keep:
                continue
            dead = not _alive(r["pid"])
            if (r["status"] == "running" and (not lock_held or dead)) or (r["status"] == "queued" and dead):
                self.end(r["id"], "failed",
                         f"interrupted during {r['stage'] or 'start-up'} (process {r['pid']} gone)")


def _row(r: dict[str, Any]) -> dict[str, Any]:
    r = dict(r)
    r["run_id"] = run_name(r["id"])
    r["metrics"] = json.loads(r["metrics"]) if r.get("metrics") else None
    r["promoted"] = None if r.get("promoted") is None else bool(r["promoted"])
    return r
