"""Which shard runs where, and what a failure costs: the caching job's scheduling rules in one place.

`ShardScheduler` is a state machine with no Ray in it, so its accounting is unit-tested directly:

- each actor runs up to `per_actor` shards at once (one computes while the next streams in and the last
  drains its writes);
- a task error (the shard itself failed: a read error, a bad write) costs that shard one attempt;
- an actor death costs the first shard it takes down one attempt; the other shards it held were only
  queued behind the death and go back to the front of the queue for free;
- storage unavailable (the object store still unreachable, or still answering 5xx, after every
  request-level retry) costs no attempt: the shard goes back to the front of the queue, no work is
  handed out for an exponentially growing, jittered pause, then a single shard probes the store until
  one succeeds. Once the store has been unavailable for `storage_patience` seconds the run stops with
  StorageOutage (committed shards stay; rerunning resumes). A shard that finds the store unavailable again
  after it has answered other shards loses an attempt after all: the fault may be its own objects';
- a dead actor gets no work until Ray has restarted it and a readiness probe answers; an actor that died
  more often than Ray restarts it, or is gone for good, leaves the pool; actors added while the job runs
  (the cluster grew) join the same way, once their first readiness probe answers;
- the `--limit` budget reserves samples for shards in flight and stops handing out work once used up;
- a shard out of attempts is recorded as failed; shards left with no actor to run them raise JobFailed.

`run_on_ray` drives the machine with Ray: one `ray.wait` per turn over every outstanding reference
(shard tasks, readiness probes, progress reports), never a blocking sleep or per-actor poll.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.caching.shard_processor import ShardResult, ShardTask
from pipeline.storage.shards import Shard

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """Some shards could not be processed after every retry; rerunning the command resumes them."""


class StorageOutage(JobFailed):
    """The object store stayed unavailable for longer than the storage patience."""


STORAGE_BACKOFF_S = (1.0, 30.0)  # first and longest pause after a shard found the store unavailable


@dataclass(frozen=True)
class Ticket:
    """One shard task handed to one actor."""

    task: ShardTask
    actor: int
    reserved: int  # samples of the --limit budget held for this task while it runs


@dataclass
class _Actor:
    load: int = 0
    deaths: int = 0
    restarting: bool = False
    alive: bool = True


@dataclass
class ShardScheduler:
    """The scheduling state of one run (see the module docstring for the rules)."""

    shards: Iterable[Shard]
    actors: int
    max_attempts: int
    max_actor_restarts: int
    budget: int | None = None  # samples still allowed by --limit; None: no limit
    per_actor: int = 2
    storage_patience: float = 300.0  # seconds the store may stay unavailable before the run stops
    backoff: tuple[float, float] = STORAGE_BACKOFF_S
    rng: random.Random = field(default_factory=random.Random, repr=False)
    queue: deque[ShardTask] = field(init=False)
    results: list[ShardResult] = field(init=False, default_factory=list)
    failed: list[dict] = field(init=False, default_factory=list)
    in_flight: set[Ticket] = field(init=False, default_factory=set)
    shard_retries: int = field(init=False, default=0)  # attempts beyond a shard's first
    storage_requeues: int = field(init=False, default=0)  # shards put back, free, because storage was down
    outage_since: float | None = field(init=False, default=None)  # first report of the current outage
    paused_until: float = field(init=False, default=0.0)
    _pauses: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.queue = deque(ShardTask(s) for s in self.shards)
        self._pool = [_Actor() for _ in range(self.actors)]

    # -- what to do next ---------------------------------------------------------------------------------------
    def ready_actors(self) -> list[int]:
        return [i for i, a in enumerate(self._pool) if a.alive and not a.restarting]

    def live_actors(self) -> int:
        """Actors in the pool, working or restarting."""
        return sum(a.alive for a in self._pool)

    def add_actor(self) -> int:
        """A new actor (the cluster grew); it gets work once its first readiness probe answers (`actor_back`)."""
        self._pool.append(_Actor(restarting=True))
        return len(self._pool) - 1

    def next_tickets(self, now: float | None = None) -> list[Ticket]:
        """Tasks to start now, each on the least loaded ready actor with room; marks them in flight.
        Nothing while a storage pause lasts; a single probing task while the store is unavailable."""
        now = time.monotonic() if now is None else now
        if now < self.paused_until:
            return []
        out = []
        while self.queue:
            if self.outage_since is not None and self.in_flight:
                break
            ready = [i for i in self.ready_actors() if self._pool[i].load < self.per_actor]
            if not ready:
                break
            task = self.queue[0]
            reserved = 0
            if self.budget is not None:
                room = self.budget - sum(t.reserved for t in self.in_flight)
                if room <= 0:
                    if not self.in_flight:
                        self.queue.clear()  # the --limit is used up: nothing more will run
                    break
                reserved = min(room, task.shard.expected_samples or room)
                task = replace(task, max_samples=room)
            self.queue.popleft()
            actor = min(ready, key=lambda i: self._pool[i].load)
            ticket = Ticket(task, actor, reserved)
            self._pool[actor].load += 1
            self.in_flight.add(ticket)
            out.append(ticket)
        return out

    @property
    def finished(self) -> bool:
        """True once nothing is running and nothing more can start."""
        return not self.in_flight and (not self.queue or not any(a.alive for a in self._pool))

    def check_stranded(self) -> None:
        """Raises JobFailed when shards are queued but no actor is left to run them."""
        if self.queue and not self.in_flight and not any(a.alive for a in self._pool):
            raise JobFailed(f"{len(self.queue)} shard(s) left with no actor to run them: every actor died "
                            "repeatedly; see the worker logs (`ray logs`) for the cause")

    # -- what happened ---------------------------------------------------------------------------------------
    def _release(self, ticket: Ticket) -> None:
        self.in_flight.discard(ticket)
        self._pool[ticket.actor].load -= 1

    def succeeded(self, ticket: Ticket, result: ShardResult, now: float | None = None) -> None:
        self._release(ticket)
        if self.budget is not None:
            self.budget -= result.samples_read
        self.results.append(result)
        if self.outage_since is not None:
            now = time.monotonic() if now is None else now
            log.info("storage answers again after %.0f s; resuming all work", now - self.outage_since)
            self.outage_since, self.paused_until, self._pauses = None, 0.0, 0

    def storage_unavailable(self, ticket: Ticket, endpoint: str, reason: str, now: float | None = None) -> None:
        """The shard found the store unavailable: back to the front of the queue, no attempt lost; pause all
        work (exponential backoff with jitter); raises StorageOutage once the outage outlasts the patience."""
        now = time.monotonic() if now is None else now
        if self.outage_since is None and ticket.task.storage_waits:
            # the store has answered other shards since this one last found it unavailable
            self.task_failed(ticket, f"storage unavailable again for this shard while it served others: {reason}")
            return
        self._release(ticket)
        self.queue.appendleft(replace(ticket.task, storage_waits=ticket.task.storage_waits + 1))
        self.storage_requeues += 1
        if self.outage_since is None:
            self.outage_since = now
        down = now - self.outage_since
        if down >= self.storage_patience:
            raise StorageOutage(
                f"object storage at {endpoint} has been unavailable for {down:.0f} s, longer than the storage "
                f"patience of {self.storage_patience:.0f} s (--storage-patience); last error: {reason}. "
                f"{len(self.queue) + len(self.in_flight)} shard(s) not done; committed shards are kept: rerun the "
                "same command to resume once the store answers")
        if now < self.paused_until:
            return  # another shard of the same pause: already waiting
        first, longest = self.backoff
        delay = min(longest, first * 2 ** self._pauses) * self.rng.uniform(0.5, 1.0)
        self._pauses += 1
        self.paused_until = now + delay
        log.warning("storage at %s unavailable (%s); shard %s requeued without losing an attempt; pausing %.1f s "
                    "(unavailable for %.0f s, patience %.0f s)", endpoint, reason, ticket.task.shard.url, delay,
                    down, self.storage_patience)

    def task_failed(self, ticket: Ticket, reason: str) -> None:
        """The shard's own failure: it loses one attempt."""
        self._release(ticket)
        self._retry_or_fail(ticket.task, reason)

    def actor_died(self, ticket: Ticket, reason: str) -> bool:
        """The actor running `ticket` died. Returns True when the actor should be probed for its restart."""
        self._release(ticket)
        actor = self._pool[ticket.actor]
        if actor.restarting or not actor.alive:
            # a casualty of a death already counted (it was queued behind the task that was running)
            self.queue.appendleft(ticket.task)
            return False
        actor.deaths += 1
        self._retry_or_fail(ticket.task, reason)
        if actor.deaths > self.max_actor_restarts:
            actor.alive = False
            log.error("actor %d died %d times; removed from the pool", ticket.actor, actor.deaths)
            return False
        actor.restarting = True
        return True

    def actor_back(self, actor: int) -> None:
        """The actor answered its readiness probe (after a restart, or as a new member of the pool)."""
        self._pool[actor].restarting = False
        log.info("actor %d is ready%s", actor, " again" if self._pool[actor].deaths else "")

    def actor_gone(self, actor: int, reason: str) -> None:
        self._pool[actor].alive = False
        self._pool[actor].restarting = False
        log.error("actor %d is gone for good (%s); removed from the pool", actor, reason)

    def _retry_or_fail(self, task: ShardTask, reason: str) -> None:
        if task.attempt >= self.max_attempts:
            log.error("shard %s failed %d times, giving up: %s", task.shard.url, task.attempt, reason)
            self.failed.append({"url": task.shard.url, "error": reason})
        else:
            log.warning("shard %s failed (attempt %d/%d), retrying: %s", task.shard.url, task.attempt,
                        self.max_attempts, reason)
            self.shard_retries += 1
            self.queue.appendleft(ShardTask(task.shard, attempt=task.attempt + 1))


def first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


@dataclass
class _Outstanding:
    """References the Ray loop waits on, by kind."""

    tasks: dict = field(default_factory=dict)    # ObjectRef -> Ticket
    probes: dict = field(default_factory=dict)   # ObjectRef -> actor index (readiness after a restart)
    reports: dict = field(default_factory=dict)  # ObjectRef -> actor index (progress of shards in flight)
    probe_due: dict = field(default_factory=dict)  # actor index -> time to ask again while Ray restarts it

    def all(self) -> list:
        return [*self.tasks, *self.probes, *self.reports]


PROBE_RETRY_S = 0.5
REPORT_EVERY_S = 2.0
GROW_EVERY_S = 5.0


def run_on_ray(scheduler: ShardScheduler, actors: list, on_result: Callable[[ShardResult], None],
               on_progress: Callable[[int], None], grow: Callable[[int, int], list] | None = None) -> None:
    """Drives `scheduler` on Ray actors (each with `process`, `status` in concurrency groups compute/status).

    `grow(live_actors, shards_left)`, asked every GROW_EVERY_S, returns new actors for the pool (the cluster
    grew); they are appended to `actors` and join once they answer a readiness probe.
    """
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    from pipeline.storage.retries import StorageUnavailableError

    out = _Outstanding()
    reported: dict[int, int] = {}
    last_report = 0.0
    last_grow = time.monotonic()

    def submit() -> None:
        for ticket in scheduler.next_tickets():
            ref = actors[ticket.actor].process.options(concurrency_group="compute").remote(ticket.task)
            out.tasks[ref] = ticket

    def probe(actor: int) -> None:
        out.probes[actors[actor].status.options(concurrency_group="status").remote()] = actor

    submit()
    while not scheduler.finished:
        now = time.monotonic()
        if grow is not None and now - last_grow >= GROW_EVERY_S and scheduler.queue:
            last_grow = now
            for handle in grow(scheduler.live_actors(), len(scheduler.queue) + len(scheduler.in_flight)):
                actors.append(handle)
                probe(scheduler.add_actor())
        for actor, due in list(out.probe_due.items()):
            if due <= now:
                del out.probe_due[actor]
                probe(actor)
        if now - last_report >= REPORT_EVERY_S and not out.reports:
            last_report = now
            for actor in scheduler.ready_actors():
                out.reports[actors[actor].status.options(concurrency_group="status").remote()] = actor
        waits = [REPORT_EVERY_S] + [max(0.0, due - now) for due in out.probe_due.values()]
        if scheduler.paused_until > now:
            waits.append(scheduler.paused_until - now)
        if out.all():
            ready, _ = ray.wait(out.all(), num_returns=1, timeout=min(waits))
        else:  # nothing outstanding: a readiness probe or the end of a storage pause is due
            time.sleep(min(waits))
            ready = []
        for ref in ready:
            if ref in out.reports:
                actor = out.reports.pop(ref)
                try:
                    reported[actor] = int(ray.get(ref).get("samples", 0))
                except Exception:  # noqa: BLE001 - a dying actor just does not report this round
                    reported.pop(actor, None)
                on_progress(sum(reported.values()))
            elif ref in out.probes:
                actor = out.probes.pop(ref)
                try:
                    ray.get(ref)
                except ActorUnavailableError:
                    out.probe_due[actor] = time.monotonic() + PROBE_RETRY_S  # still restarting
                except RayActorError as exc:
                    scheduler.actor_gone(actor, type(exc).__name__)
                else:
                    scheduler.actor_back(actor)
            else:
                ticket = out.tasks.pop(ref)
                try:
                    result: ShardResult = ray.get(ref)
                except RayActorError as exc:
                    reported.pop(ticket.actor, None)
                    if scheduler.actor_died(ticket, f"worker died ({first_line(exc)})"):
                        probe(ticket.actor)
                    continue
                except RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    if isinstance(cause, StorageUnavailableError):
                        scheduler.storage_unavailable(ticket, cause.endpoint, cause.detail)
                    else:
                        scheduler.task_failed(ticket, first_line(cause))
                    continue
                scheduler.succeeded(ticket, result)
                on_result(result)
        scheduler.check_stranded()
        submit()
    scheduler.check_stranded()


def describe_failures(failed: list[dict[str, Any]], max_attempts: int, committed: int) -> str:
    """The message of the JobFailed raised after a run in which shards ran out of attempts."""
    return (f"{len(failed)} shard(s) failed after {max_attempts} attempts, e.g. {failed[0]}; the manifest covers "
            f"the {committed} committed shards. Rerun the same command to retry the rest.")
