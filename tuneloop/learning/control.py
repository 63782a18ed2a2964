"""What admins can do with the learning loop: ``bot.admin.LearningControl``.

Boundary: the store (run records, feedback counts), the registry (versions,
the live pointer) and the training process it starts. Every action takes a
``community``: under ``[trainer] scope = "community"`` it acts on that
community's line (None: ``local``, the operator's own), under ``"global"`` on
the one line whatever is asked. It loads no model:
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

from tuneloop.community import LOCAL
from tuneloop.config import Config
from tuneloop.errors import NotFoundError, TrainingError
from tuneloop.learning.registry import BASE, GLOBAL, Registry
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

    # -- lines ---------------------------------------------------------------------------

    def key(self, community: str | None) -> str:
        """The run community of ``community``'s line: itself (None: local), or ``*`` under scope global."""
        if self.config.trainer.scope == "global":
            return GLOBAL
        return LOCAL if community is None else community

    def line(self, community: str | None) -> Registry:
        """The registry line ``community`` trains and is served from."""
        return Registry.line(self.registry.root, self.key(community))

    def _data(self, key: str) -> Store:
        return self.store.scoped(None if key == GLOBAL else key)

    def due(self) -> list[tuple[str, int]]:
        """``(community, new feedback)`` of each line with ``min_feedback`` new items, most first."""
        keys = [GLOBAL] if self.config.trainer.scope == "global" else self.store.communities()
        found = [(k, self.new_feedback(k)) for k in keys]
        return sorted(((k, n) for k, n in found if n >= self.config.trainer.min_feedback),
                      key=lambda kn: (-kn[1], kn[0]))

    # -- runs --------------------------------------------------------------------------

    def new_feedback(self, community: str | None = None) -> int:
        """Feedback of ``community``'s line stored since its last finished run read the store."""
        key = self.key(community)
        last = self.runs.last_done(key)
        return self._data(key).count_feedback_since(last["data_cutoff"] if last else None)

    def untrained_feedback(self, community: str | None = None) -> int:
        """Feedback the line's live version has not trained on (all of it when the base model is live).

        An admin's retrain needs at least one such item; a rejected run or a
        rollback therefore does not block a retrain with other settings.
        """
        key = self.key(community)
        line = Registry.line(self.registry.root, key)
        live = line.live()
        cutoff = line.meta(live).get("data_cutoff") if live else None
        return self._data(key).count_feedback_since(cutoff)

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

    def command(self, run_id: int, reason: str, community: str = GLOBAL) -> list[str]:
        t = self.config.trainer
        py = t.python or sys.executable
        args = ["-m", "trainer.run", "--run-id", str(run_id), "--reason", reason]
        if community != GLOBAL:
            args += ["--community", community]
        if self.config.source is not None:
            args += ["--config", str(self.config.source)]
        if t.launcher == "torchrun":
            return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={t.processes}", *args]
        if t.launcher == "accelerate":
            return [py, "-m", "accelerate.commands.launch", f"--num_processes={t.processes}", *args]
        return [py, *args]

    def start_run(self, reason: str, *, scheduled: bool = False, community: str | None = None
                  ) -> dict[str, Any]:
        """Start a run of ``community``'s line now in its own process; refuse while one is going
        (of any line) or without new feedback.

        An admin's run needs one feedback item the live version has not trained
        on; a scheduled one needs ``min_feedback`` items stored since the last
        finished run (so a rejected run is not retried on the same data).
        """
        key = self.key(community)
        whose = "" if key in (GLOBAL, LOCAL) else f" of {key}"
        if self._closed:
            raise TrainingError("the server is stopping; start the run once it is back")
        going = self.running()
        if going is not None or self.registry.lock().held_elsewhere():
            which = going["run_id"] if going else "a run"
            raise TrainingError(f"{which} is going; wait for it to finish (tuneloop status)")
        if scheduled:
            new, need = self.new_feedback(key), self.config.trainer.min_feedback
            if new < need:
                raise TrainingError(f"{new} new feedback items{whose} since the last run; a scheduled run "
                                    f"needs {need}")
        else:
            new = self.untrained_feedback(key)
            if new == 0:
                others = [] if key != LOCAL else [c for c in self.store.communities()
                                                  if c != LOCAL and self.untrained_feedback(c)]
                hint = f" (communities with some: {', '.join(others)}; say which with --community)" if others else ""
                raise TrainingError(f"no feedback{whose} the live version has not trained on; nothing to "
                                    f"train on{hint}")
        run_id = self.runs.create(reason, community=key)
        logs = self.registry.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = (logs / f"{run_name(run_id)}.log").open("ab")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        # The project root first on the path, so `-m trainer.run` finds this checkout.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.Popen(self.command(run_id, reason, key), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except OSError as e:
            self.runs.update(run_id, status="failed", finished_at=time.time(), error=f"cannot start: {e}")
            raise TrainingError(f"cannot start the training process: {e}") from None
        finally:
            out.close()
        self._children[proc.pid] = proc
        self._child_runs[proc.pid] = run_id
        self.runs.update(run_id, pid=proc.pid)
        log.info("training run started: run=%s community=%s reason=%s pid=%d new_feedback=%d",
                 run_name(run_id), key, reason, proc.pid, new)
        return {"run_id": run_name(run_id), "community": key, "pid": proc.pid, "new_feedback": new,
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
        return {"run_id": row["run_id"], "community": row["community"], "status": row["status"],
                "version": row["version"],
                "promoted": bool(row["promoted"]), "dataset_hash": row["dataset_hash"], "metrics": metrics,
                "checks": checks, "error": row["error"],
                "live": Registry.line(self.registry.root, row["community"]).live() or BASE,
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

    def status(self, community: str | None = None) -> dict[str, Any]:
        key = self.key(community)
        going = self.running()
        last = self.runs.last_finished(key)
        return {
            "community": key,
            "live_version": Registry.line(self.registry.root, key).live() or BASE,
            "last_run": None if last is None else {
                "run_id": last["run_id"], "status": last["status"], "version": last["version"],
                "promoted": last["promoted"], "error": last["error"], "finished_at": last["finished_at"]},
            "new_feedback": self.new_feedback(key),
            "min_feedback": self.config.trainer.min_feedback,
            # One run at a time over every line: a run of another community holds this one's too.
            "running": None if going is None else (
                f"{going['run_id']} ({going['stage'] or going['status']})"
                + ("" if going["community"] == key else f" of {going['community']}")),
            "next_run": self.next_run(),
            # The operator (no community: the CLI) sees every community's live version; an admin of
            # one community only their own.
            **({"communities": {k: line.live() or BASE for k, line in self.registry.lines().items()}}
               if community is None and key != GLOBAL else {}),
        }

    def models(self, community: str | None = None) -> list[dict[str, Any]]:
        line = self.line(community)
        live = line.live()
        out = [{"version": BASE, "model": self.config.model.base, "verdict": "base", "live": live is None,
                "parent": None, "metrics": {}}]
        for meta in line.list():
            out.append({k: meta.get(k) for k in ("version", "parent", "verdict", "live", "metrics", "created_at",
                                                 "dataset_hash", "run_id", "method")})
        return out

    def promote(self, version: str, by: str = "", community: str | None = None) -> dict[str, Any]:
        line = self.line(community)
        if version != BASE:
            line.path(version)
        entry = line.promote(version, by=by)
        self._memory_follows(line, entry)
        out = {"version": entry["to"], "previous": entry["from"], "community": self.key(community)}
        if version != BASE and line.meta(version).get("verdict") != "passed":
            out["warning"] = f"{version} was rejected by the gate; promoted by an admin's decision"
        return out

    def rollback(self, version: str | None = None, by: str = "", community: str | None = None
                 ) -> dict[str, Any]:
        line = self.line(community)
        if version is not None and version != BASE:
            line.path(version)
        entry = line.rollback(version, by=by)
        self._memory_follows(line, entry)
        return {"version": entry["to"], "previous": entry["from"], "community": self.key(community)}

    def _memory_follows(self, line: Registry, entry: dict[str, Any]) -> None:
        """The memory's statuses follow the live weights: what the version that left consolidated
        goes back to the fast path; what the gate found the new live version answers leaves it."""
        if entry["from"] == entry["to"]:
            return
        if entry["from"] != BASE:
            self.store.memory_unconsolidate([line.adapter_name(entry["from"])])
        if entry["to"] != BASE:
            # Measured on these very weights when the version was made; items stored since stay fast.
            checked = line.report(entry["to"]).get("memory") or {}
            self.store.set_memory_status({int(k): bool(v) for k, v in checked.items()},
                                         line.adapter_name(entry["to"]))

    def version(self, version: str, community: str | None = None) -> dict[str, Any]:
        if version == BASE:
            raise NotFoundError("the base model has no training report")
        line = self.line(community)
        return {"meta": line.meta(version), "report": line.report(version)}


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group is gone already
        pass
