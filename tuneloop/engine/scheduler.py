"""Which sequences the local engine computes next: queue, admission, states.

Boundary: ``Sequence`` objects and their status, no tensors. The scheduler
owns the ``waiting`` queue and the ``running`` batch (in the order the model
runner's cache holds its rows), refuses work past ``max_batch + max_queue``,
applies cancellations, and holds back admission while an exclusive job (a
weight swap) waits for the batch to drain. The engine thread calls
``schedule`` and ``postprocess`` once a step; submit and cancel come from the
event loop's thread, hence the lock.

A step either prefills the newcomers or decodes every running row, as in
nano-vllm. After a prefill the next step decodes, so newcomers arriving step
after step cannot keep the running rows from advancing.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneloop.engine.sequence import Sequence, SequenceStatus
from tuneloop.errors import BusyError


@dataclass
class ScheduledBatch:
    """What one engine step computes."""

    seqs: list[Sequence]  # rows to compute: the newcomers (prefill) or every running row (decode)
    is_prefill: bool
    running: list[Sequence]  # every row of the batch after this step, in the runner's cache order
    cancelled: list[Sequence] = field(default_factory=list)  # ended by a cancel; completions still due
    ended: int = 0  # rows the output processor ended in this step (eos, stop, length, cancel)


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int) -> None:
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # replaced, not mutated, under the lock
        self.total_requests = 0
        self.job: tuple[Callable[[], object], object] | None = None  # (fn, future) of run_exclusive
        self.between: list[tuple[Callable[[], object], object]] = []  # (fn, future) of run_between
        self._lock = threading.Condition()
        self._open = True
        self._decode_next = False
        self._cancels = 0  # cancel requests since the last schedule(): most steps have none to look for
        # Cancelled by the step under way, their completions not yet handed out.
        self._cancelled: list[Sequence] = []

    # ---------------------------------------------------------- any thread

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; ``BusyError`` when ``max_queue`` requests already wait for a row."""
        with self._lock:
            free = max(0, self.max_batch - len(self.running))
            queued = max(0, len(self.waiting) - free)
            if len(self.waiting) >= free and queued >= self.max_queue:
                raise BusyError(f"engine busy: {queued} requests queued; try again shortly")
            seq.status = SequenceStatus.WAITING
            self.waiting.append(seq)
            self.total_requests += 1
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        """Ask for ``request_id`` to end; the next step (or the one under way) ends it."""
        with self._lock:
            for seq in self.waiting:
                if seq.id == request_id:
                    seq.cancel_requested = True
                    self._cancels += 1
            for seq in self.running:
                if seq.id == request_id:
                    seq.cancel_requested = True
                    self._cancels += 1
            self._lock.notify()

    def cancel_all(self) -> None:
        with self._lock:
            for seq in self.waiting:
                seq.cancel_requested = True
            for seq in self.running:
                seq.cancel_requested = True
            self._cancels += 1
            self._lock.notify()

    def set_job(self, job: tuple[Callable[[], object], object]) -> None:
        """Run ``job`` on the engine thread once the running rows have finished; admit nothing till then."""
        with self._lock:
            self.job = job
            self._lock.notify()

    def add_between(self, job: tuple[Callable[[], object], object]) -> None:
        """Run ``job`` on the engine thread before the next step, the running rows kept."""
        with self._lock:
            self.between.append(job)
            self._lock.notify()

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def load(self) -> tuple[int, int]:
        """(queued, active): requests waiting beyond the batch's free rows, and those it holds or will."""
        with self._lock:
            free = max(0, self.max_batch - len(self.running))
            return max(0, len(self.waiting) - free), len(self.running) + min(len(self.waiting), free)

    def open(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        """Let the engine thread leave ``wait_for_work``."""
        with self._lock:
            self._open = False
            self._lock.notify()

    # --------------------------------------------------------- engine thread

    def wait_for_work(self) -> bool:
        """Block until there is something to do; False once closed."""
        with self._lock:
            while (self._open and not self.waiting and not self.running and self.job is None
                   and not self.between):
                self._lock.wait()
            return self._open

    def take_between(self) -> list[tuple[Callable[[], object], object]]:
        """The jobs to run between this step and the next."""
        with self._lock:
            jobs, self.between = self.between, []
            return jobs

    def take_job(self) -> tuple[Callable[[], object], object] | None:
        """The pending exclusive job, once no row is running (the batch has drained)."""
        with self._lock:
            if self.job is None or self.running:
                return None
            job, self.job = self.job, None
            return job

    def schedule(self) -> ScheduledBatch:
        """End the cancelled sequences, then admit newcomers for a prefill or decode the batch."""
        with self._lock:
            cancelled = self._cancelled = self._take_cancelled()
            room = self.max_batch - len(self.running)
            admit = (
                self.waiting and room > 0 and self.job is None and not (self._decode_next and self.running)
            )
            if admit:
                new = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                for seq in new:
                    seq.status = SequenceStatus.RUNNING
                self.running = self.running + new
                self._decode_next = True
                return ScheduledBatch(new, True, self.running, cancelled)
            self._decode_next = False
            return ScheduledBatch(self.running, False, self.running, cancelled)

    def _take_cancelled(self) -> list[Sequence]:
        if not self._cancels:
            return []
        self._cancels = 0
        cancelled = []
        if any(s.cancel_requested for s in self.waiting):
            cancelled += [s for s in self.waiting if s.cancel_requested]
            self.waiting = collections.deque(s for s in self.waiting if not s.cancel_requested)
        if any(s.cancel_requested for s in self.running):
            cancelled += [s for s in self.running if s.cancel_requested]
            self.running = [s for s in self.running if not s.cancel_requested]
        for seq in cancelled:
            seq.finish("cancelled")
        return cancelled

    def postprocess(self, batch: ScheduledBatch) -> None:
        """Drop the rows that finished in this step from the batch."""
        self._cancelled = []
        if batch.ended:
            with self._lock:
                self.running = [s for s in self.running if not s.is_finished]

    def abort_all(self) -> list[Sequence]:
        """Empty both queues (after a failed step, or at shutdown): the sequences still owed an ending.

        Those are the unfinished ones, and those the failed step had cancelled
        (their completions may not have been made).
        """
        with self._lock:
            seqs = [s for s in list(self.running) + list(self.waiting) if not s.is_finished]
            cancelled, self._cancelled = self._cancelled, []
            self.waiting = collections.deque()
            self.running = []
            self._decode_next = False
        for seq in seqs:
            seq.finish("error")
        return seqs + cancelled
