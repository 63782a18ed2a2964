"""The learning loop inside ``tuneloop run``: scheduled runs and hot-swapping versions.

Boundary: it starts training processes (through ``tuneloop.learning.control.Control``)
and follows the registry's ``LIVE`` pointer; it never trains or evaluates in
this process, so serving goes on while a run trains.

- ``LiveFollower`` is the one place that makes an engine serve the versions
  the ``LIVE`` pointers name. Under ``[trainer] scope = "global"`` it swaps
  the one line's version into the weights (``swap_adapter``); under
  ``"community"`` it loads each community's live version as a named adapter
  (``load_adapter``; the name is the registry's adapter name, ``v3`` for
  local's, ``slack:T0123/v3`` for others) and unloads what no LIVE names, and
  ``Chat`` passes a community's adapter with each of its requests
  (``adapter_for``): the weights served by default stay the base model's, so
  one community's training never reaches another's replies. Under
  ``[trainer] reach = "taught"`` a version answers only the messages near
  what it was taught (``taught_for``; ``Chat`` routes the others to the base
  weights, ``tuneloop.memory.reach``). Every command
  that serves calls it once at start
  (``bot.runtime.services``), and ``tuneloop run`` polls it every ``poll``
  seconds, so a version a run promoted, or one an admin promoted or rolled
  back from the CLI or another process, is swapped in; replies record the
  version that produced them. A version that cannot be served is logged in
  one line, the engine keeps the weights it has, and it is not tried again
  until ``LIVE`` names another.
- An APScheduler 3.x ``AsyncIOScheduler`` fires on ``[trainer] schedule``
  (``interval:SECONDS`` or a 5-field cron expression); a firing starts a run
  of the community with the most new feedback, when it has ``min_feedback``
  new items since its line's last run and no other run is going (the
  registry's fcntl lock, which dies with its process, and the store's run
  records); the other communities due wait for the next firings.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from tuneloop.community import LOCAL
from tuneloop.config import Config, parse_schedule
from tuneloop.errors import TrainingError, TuneloopError
from tuneloop.learning.registry import GLOBAL, Registry
from tuneloop.memory.reach import read_taught

log = logging.getLogger(__name__)


def make_trigger(text: str):
    kind, value = parse_schedule(text)
    if kind == "interval":
        from apscheduler.triggers.interval import IntervalTrigger

        return IntervalTrigger(seconds=value)
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(value)


#: engine -> {community: the adapter name serving it}. Per engine, not per follower: start-up
#: (``bot.runtime.services``) and ``tuneloop run``'s learning service each follow the same engine.
_SERVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: engine -> {adapter name: the prompts its version was taught, ``tuneloop.memory.reach``; None: no record}
_TAUGHT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_for(engine, community: str) -> str | None:
    """The adapter a request of ``community`` names (None: the engine's default weights)."""
    table = _SERVED.get(engine)
    return None if table is None else table.get(community)


def taught_for(engine, adapter: str) -> list[str] | None:
    """What the version served as ``adapter`` was taught (``taught.json``); None where it recorded nothing."""
    table = _TAUGHT.get(engine)
    return None if table is None else table.get(adapter)


class LiveFollower:
    """Keeps an engine serving the registry's live versions (the base model where none is)."""

    def __init__(self, config: Config, engine, registry: Registry | None = None):
        self.engine = engine
        self.registry = registry or Registry(config.trainer.registry)
        self.base_name = config.model.base
        self.scope = config.trainer.scope
        if self.scope == "global" and config.trainer.reach == "taught":
            log.info('[trainer] reach = "taught" routes the versions served per community (scope = "community"); '
                     'under scope = "global" the live version answers every message')
        self._failed: str | None = None
        self._failed_lines: dict[str, str] = {}  # community -> the adapter name that could not be served

    async def follow(self) -> bool:
        """Serve the live versions the engine does not serve yet; True when anything changed."""
        if self.scope == "community":
            return await self._follow_lines()
        return await self._follow_top()

    async def _follow_lines(self) -> bool:
        """Scope community: each line's live version loaded under its adapter name, nothing else."""
        engine = self.engine
        served = _SERVED.setdefault(engine, {})
        changed = False
        try:
            lines = {LOCAL: Registry.line(self.registry.top, LOCAL), **self.registry.lines()}
        except OSError as e:
            log.error("cannot read the registry %s: %s", self.registry.top, e)
            return False
        for key in sorted(set(lines) | set(served)):
            line = lines.get(key)
            have = served.get(key)
            want = "the LIVE pointer"
            try:
                live = line.live() if line is not None else None
                want = line.adapter_name(live) if line is not None else None
                if want == have:
                    self._failed_lines.pop(key, None)
                    continue
                if want is not None and want == self._failed_lines.get(key):
                    continue
                if want is None:
                    del served[key]  # new requests first, then the weights
                    await engine.unload_adapter(have)
                    _TAUGHT.get(engine, {}).pop(have, None)
                else:
                    why = line.base_mismatch(live, getattr(engine, "model_path", None))
                    if why:
                        raise TrainingError(f"a version for another base model: {why}")
                    if line.meta(live).get("community") == GLOBAL:
                        raise TrainingError(f"{live} was trained on every community's feedback "
                                            '(scope = "global"); not served to one under scope = "community"')
                    folder = line.adapter(live)
                    await engine.load_adapter(want, str(folder))
                    _TAUGHT.setdefault(engine, {})[want] = read_taught(folder)
                    served[key] = want
                    if have is not None:
                        await engine.unload_adapter(have)
                        _TAUGHT.get(engine, {}).pop(have, None)
            # What a broken version can raise: the engine's ModelError, a version folder,
            # meta.json or LIVE file missing or unreadable, a back end without adapters.
            except (TuneloopError, NotImplementedError, OSError, ValueError) as e:
                if want != self._failed_lines.get(key):
                    first = str(e).splitlines()[0] if str(e) else ""
                    log.error("cannot serve %s: %s: %s; still serving %s", want or "the base model",
                              type(e).__name__, first,
                              served.get(key) or engine.model_version)
                self._failed_lines[key] = want
                continue
            self._failed_lines.pop(key, None)
            changed = True
            log.info("now serving %s to community %s", want or f"{engine.model_version} (no version)", key)
        return changed

    async def _follow_top(self) -> bool:
        """Scope global: the top line's live version swapped into the weights every request uses."""
        engine = self.engine
        want = "the LIVE pointer"
        try:
            live = self.registry.live()
            want = live or self.base_name
            if engine.model_version == want:
                self._failed = None
                return False
            if want == self._failed:
                return False
            why = self.registry.base_mismatch(live, getattr(engine, "model_path", None))
            if why:
                raise TrainingError(f"a version for another base model: {why}")
            adapter = self.registry.adapter(live)
            await engine.swap_adapter(None if adapter is None else str(adapter), want)
        # What a broken version can raise: the engine's ModelError, a version folder,
        # meta.json or LIVE file missing or unreadable, a back end that cannot swap.
        except (TuneloopError, NotImplementedError, OSError, ValueError) as e:
            if want != self._failed:  # tried again when LIVE names another version, not every poll
                first = str(e).splitlines()[0] if str(e) else ""
                log.error("cannot serve %s: %s: %s; still serving %s", want, type(e).__name__, first,
                          engine.model_version)
            self._failed = want
            return False
        self._failed = None
        log.info("now serving %s", want)
        return True


class LearningService:
    """Scheduler + live-pointer watcher + the admins' ``control``, for one serving process."""

    def __init__(self, services, poll: float = 1.0):
        from tuneloop.learning.control import Control

        self.services = services
        self.config = services.config
        self.poll = poll
        self.scheduler = None
        self.control = Control(self.config, services.store, next_run=self.next_run)
        self.follower = LiveFollower(self.config, services.engine, self.control.registry)
        self._watcher: asyncio.Task | None = None
        #: the runs this service started that its ``stop`` stopped (``Control.stop_children``)
        self.stopped_runs: list[dict[str, Any]] = []
        #: communities the last firing found due that wait for the run before them to end
        self._due: list[str] = []

    async def start(self) -> None:
        await self.follow_live()
        self._watcher = asyncio.create_task(self._watch(), name="tuneloop-live-watcher")
        if self.config.trainer.enabled:
            from apscheduler.schedulers.asyncio import AsyncIOScheduler

            self.scheduler = AsyncIOScheduler()
            self.scheduler.add_job(self.tick, make_trigger(self.config.trainer.schedule), id="retrain",
                                   max_instances=1, coalesce=True)
            self.scheduler.start()
            log.info("training scheduled: %s, at least %d new feedback items", self.config.trainer.schedule,
                     self.config.trainer.min_feedback)

    async def stop(self, grace: float = 10.0) -> list[dict[str, Any]]:
        """Stop scheduling and following; stop the training runs this process started.

        Returns (and keeps in ``stopped_runs``) one entry per run stopped.
        """
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
            self._watcher = None
        stopped = await asyncio.to_thread(self.control.stop_children, grace)
        self.stopped_runs += stopped
        return stopped

    def next_run(self) -> str | None:
        if self.scheduler is None:
            return None
        job = self.scheduler.get_job("retrain")
        when = getattr(job, "next_run_time", None) if job else None
        return when.isoformat(timespec="seconds") if when else None

    async def tick(self) -> dict[str, Any] | None:
        """One scheduler firing: the communities with ``min_feedback`` new items are due, most first;
        the first starts now if no run is going, each next one when the run before it has ended
        (``start_due``, from the watcher)."""
        due = await asyncio.to_thread(self.control.due)
        if not due:
            log.info("scheduled run skipped: no community has %d new feedback items",
                     self.config.trainer.min_feedback)
            return None
        log.info("scheduled runs due: %s", ", ".join(f"{c} ({n} new)" for c, n in due))
        self._due = [c for c, _ in due]
        return await self.start_due()

    async def start_due(self) -> dict[str, Any] | None:
        """Start a run of the next community due, unless a run (of any line) is going."""
        while self._due:
            if self.control.running() is not None or self.control.registry.lock().held_elsewhere():
                return None
            community = self._due.pop(0)
            try:
                return self.control.start_run("schedule", scheduled=True, community=community)
            except TrainingError as e:
                log.info("scheduled run skipped: community=%s: %s", community, e)
        return None

    async def follow_live(self) -> bool:
        """Serve the registry's live version if the engine does not already; True when it swapped."""
        return await self.follower.follow()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.follow_live()
                await asyncio.get_running_loop().run_in_executor(None, self.control.reap)
                if self._due:
                    await self.start_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 — the watcher must outlive one bad poll
                log.exception("live-version watcher")
