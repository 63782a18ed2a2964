"""What admins can do with the learning loop: ``bot.admin.LearningControl``.

Boundary: the store (run records, feedback counts), the registry (versions,
the live pointer) and the training process it starts. It loads no model:
the bot's ``tuneloop run`` and the CLI both use it, and a running server
follows what either did through the registry's ``LIVE`` pointer.

A run is a separate process (``python -m trainer.run``, or under
``torchrun`` / ``accelerate launch``), started in its own session so that it
neither blocks nor dies with the caller; its log goes to
``<registry>/logs/run-N.log``. Its own session also keeps the terminal's
Ctrl-C from reaching it: the serving process stops the runs it started
itself (``stop_children``) and marks them ``cancelled``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneloop.config import Config
from tuneloop.errors import NotFoundError, TrainingError
from tuneloop.learning.registry import BASE, Registry
from tuneloop.learning.runs import FINISHED, Runs, parse_run, run_name
from tuneloop.store import Store

log = logging.getLogger(__name__)


class Control:
    """``start_run``, ``status``, ``models``, ``promote``, ``rollback`` — for CLI, Slack and Discord alike."""

    def __init__(self, config: Config, store: Store, *, next_run: Callable[[], str | None] | None = None):
        self.config = config
        self.store = store
        self.registry = Registry(config.trainer.registry)
        self.runs = Runs(store)
        self.next_run = next_run or (lambda: None)
        self._children: dict[int, subprocess.Popen] = {}  # pid -> the run processes this object started
        self._child_runs: dict[int, int] = {}  # pid -> run id (a torchrun worker records its own pid)
        self._closed = False

    # -- runs --------------------------------------------------------------------------

    def new_feedback(self) -> int:
        """Feedback stored since the last finished run read the store."""
        last = self.runs.last_done()
        return self.store.count_feedback_since(last["data_cutoff"] if last else None)

    def untrained_feedback(self) -> int:
        """Feedback the live version has not trained on (all of it when the base model is live).

        An admin's retrain needs at least one such item; a rejected run or a
        rollback therefore does not block a retrain with other settings.
        """
        live = self.registry.live()
        cutoff = self.registry.meta(live).get("data_cutoff") if live else None
        return self.store.count_feedback_since(cutoff)

    def running(self) -> dict[str, Any] | None:
        self.reap()
        active = self.runs.active()
        return active[-1] if active else None

    def reap(self) -> None:
        """Collect finished children; mark runs that died without saying so as failed."""
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]
                self._child_runs.pop(pid, None)
        self.runs.reap(lock_held=self.registry.lock().held_elsewhere())

    def command(self, run_id: int, reason: str) -> list[str]:
        t = self.config.trainer
        py = t.python or sys.executable
        args = ["-m", "trainer.run", "--run-id", str(run_id), "--reason", reason]
        if self.config.source is not None:
            args += ["--config", str(self.config.source)]
        if t.launcher == "torchrun":
            return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={t.processes}", *args]
        if t.launcher == "accelerate":
            return [py, "-m", "accelerate.commands.launch", f"--num_processes={t.processes}", *args]
        return [py, *args]

    def start_run(self, reason: str, *, scheduled: bool = False) -> dict[str, Any]:
        """Start a run now in its own process; refuse while one is going or without new feedback.

        An admin's run needs one feedback item the live version has not trained
        on; a scheduled one needs ``min_feedback`` items stored since the last
        finished run (so a rejected run is not retried on the same data).
        """
        if self._closed:
            raise TrainingError("the server is stopping; start the run once it is back")
        going = self.running()
        if going is not None or self.registry.lock().held_elsewhere():
            which = going["run_id"] if going else "a run"
            raise TrainingError(f"{which} is going; wait for it to finish (tuneloop status)")
        if scheduled:
            new, need = self.new_feedback(), self.config.trainer.min_feedback
            if new < need:
                raise TrainingError(f"{new} new feedback items since the last run; a scheduled run needs {need}")
        else:
            new = self.untrained_feedback()
            if new == 0:
                raise TrainingError("no feedback the live version has not trained on; nothing to train on")
        run_id = self.runs.create(reason)
        logs = self.registry.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = (logs / f"{run_name(run_id)}.log").open("ab")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        # The project root first on the path, so `-m trainer.run` finds this checkout.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.Popen(self.command(run_id, reason), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as e:
            self.runs.update(run_id, status="failed", finished_at=time.time(), error=f"cannot start: {e}")
            raise TrainingError(f"cannot start the training process: {e}") from None
        finally:
            out.close()
        self._children[proc.pid] = proc
        self._child_runs[proc.pid] = run_id
        self.runs.update(run_id, pid=proc.pid)
        log.info("training run started: run=%s reason=%s pid=%d new_feedback=%d", run_name(run_id), reason,
                 proc.pid, new)
        return {"run_id": run_name(run_id), "pid": proc.pid, "new_feedback": new,
                "log": str(logs / f"{run_name(run_id)}.log")}

    def wait(self, run_id: str | int, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        """Block until the run is done or failed; its record."""
        rid = parse_run(run_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.reap()
            row = self.runs.get(rid)
            if row["status"] in FINISHED:
                return row
            if deadline is not None and time.monotonic() > deadline:
                raise TrainingError(f"{run_name(rid)} has not finished after {timeout:.0f} s")
            time.sleep(poll)

    def outcome(self, run_id: str | int) -> dict[str, Any]:
        """A finished run as ``retrain --json`` prints it."""
        row = self.runs.get(parse_run(run_id))
        metrics = dict(row["metrics"] or {})
        checks = metrics.pop("checks", [])
        return {"run_id": row["run_id"], "status": row["status"], "version": row["version"],
                "promoted": bool(row["promoted"]), "dataset_hash": row["dataset_hash"], "metrics": metrics,
                "checks": checks, "error": row["error"], "live": self.registry.live() or BASE,
                "seconds": None if not row["finished_at"] or not row["started_at"]
                else round(row["finished_at"] - row["started_at"], 1)}

    def stop_children(self, grace: float = 10.0) -> list[dict[str, Any]]:
        """Stop the runs this object started that are still going, and refuse new ones.

        Each run's process group gets SIGTERM, then SIGKILL after ``grace``
        seconds; the run is then marked ``cancelled`` unless it ended on its
        own first. Blocking: call it from a thread in async code. One entry per
        run it stopped: ``run_id``, ``pid``, ``log``, ``status`` (as recorded
        now) and ``cancelled`` (False: the run had recorded its end itself).
        """
        self._closed = True
        out = []
        for pid, proc in list(self._children.items()):
            run_id = self._child_runs.pop(pid, None)
            del self._children[pid]
            if proc.poll() is not None:
                continue  # it ended on its own (a crash is left to ``reap``: failed)
            _signal_group(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("training run %s did not stop within %.0f s of SIGTERM: killing pid=%d",
                            run_name(run_id) if run_id else "?", grace, pid)
                _signal_group(pid, signal.SIGKILL)
                proc.wait()
            # Workers of a torchrun/accelerate launch share the group: none may outlive it.
            _signal_group(pid, signal.SIGKILL)
            if run_id is None:
                continue
            cancelled = self.runs.end(run_id, "cancelled", "cancelled: the server that started it stopped")
            entry = {"run_id": run_name(run_id), "pid": pid, "cancelled": cancelled,
                     "status": "cancelled" if cancelled else self.runs.get(run_id)["status"],
                     "log": str(self.registry.root / "logs" / f"{run_name(run_id)}.log")}
            log.info("training run stopped: run=%s pid=%d status=%s", entry["run_id"], pid, entry["status"])
            out.append(entry)
        return out

    # -- LearningControl ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        going = self.running()
        last = self.runs.last_finished()
        return {
            "live_version": self.registry.live() or BASE,
            "last_run": None if last is None else {
                "run_id": last["run_id"], "status": last["status"], "version": last["version"],
                "promoted": last["promoted"], "error": last["error"], "finished_at": last["finished_at"]},
            "new_feedback": self.new_feedback(),
            "min_feedback": self.config.trainer.min_feedback,
            "running": None if going is None else f"{going['run_id']} ({going['stage'] or going['status']})",
            "next_run": self.next_run(),
        }

    def models(self) -> list[dict[str, Any]]:
        live = self.registry.live()
        out = [{"version": BASE, "model": self.config.model.base, "verdict": "base", "live": live is None,
                "parent": None, "metrics": {}}]
        for meta in self.registry.list():
            out.append({k: meta.get(k) for k in ("version", "parent", "verdict", "live", "metrics", "created_at",
                                                 "dataset_hash", "run_id", "method")})
        return out

    def promote(self, version: str, by: str = "") -> dict[str, Any]:
        if version != BASE:
            self.registry.path(version)
        entry = self.registry.promote(version, by=by)
        out = {"version": entry["to"], "previous": entry["from"]}
        if version != BASE and self.registry.meta(version).get("verdict") != "passed":
            out["warning"] = f"{version} was rejected by the gate; promoted by an admin's decision"
        return out

    def rollback(self, version: str | None = None, by: str = "") -> dict[str, Any]:
        if version is not None and version != BASE:
            self.registry.path(version)
        entry = self.registry.rollback(version, by=by)
        return {"version": entry["to"], "previous": entry["from"]}

    def version(self, version: str) -> dict[str, Any]:
        if version == BASE:
            raise NotFoundError("the base model has no training report")
        return {"meta": self.registry.meta(version), "report": self.registry.report(version)}


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group is gone already
        pass
