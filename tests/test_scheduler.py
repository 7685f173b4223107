"""The caching job's scheduling rules (pipeline.caching.scheduler.ShardScheduler), event by event, without Ray."""

from __future__ import annotations

import pytest

from pipeline.caching.scheduler import JobFailed, ShardScheduler, StorageOutage
from pipeline.caching.shard_processor import ShardResult
from pipeline.storage.shards import Shard


def shards(n: int, samples: int | None = None) -> list[Shard]:
    return [Shard(f"s3://b/s{i}.tar", f"s{i}", samples) for i in range(n)]


def result(ticket, samples: int = 4) -> ShardResult:
    return ShardResult(ticket.task.shard.shard_id, ticket.task.shard.url, samples_read=samples, ok=samples)


def test_two_shards_in_flight_per_actor_on_the_least_loaded_actor():
    s = ShardScheduler(shards(7), actors=3, max_attempts=3, max_actor_restarts=2)
    tickets = s.next_tickets()
    assert len(tickets) == 6  # 3 actors x 2
    assert sorted(t.actor for t in tickets) == [0, 0, 1, 1, 2, 2]
    assert [t.task.shard.shard_id for t in tickets] == [f"s{i}" for i in range(6)]  # input order
    assert s.next_tickets() == []  # every actor is full
    done = next(t for t in tickets if t.actor == 1)
    s.succeeded(done, result(done))
    (nxt,) = s.next_tickets()
    assert nxt.actor == 1 and nxt.task.shard.shard_id == "s6"


def test_task_error_costs_one_attempt_and_exhausted_attempts_fail_the_shard():
    s = ShardScheduler(shards(1), actors=1, max_attempts=3, max_actor_restarts=5)
    attempts = []
    for _ in range(3):
        (t,) = s.next_tickets()
        attempts.append(t.task.attempt)
        s.task_failed(t, "OSError: connection reset")
    assert attempts == [1, 2, 3]
    assert s.failed == [{"url": "s3://b/s0.tar", "error": "OSError: connection reset"}]
    assert s.finished and not s.queue


def test_actor_death_costs_the_running_shard_an_attempt_and_requeues_the_one_behind_it_for_free():
    s = ShardScheduler(shards(3), actors=1, max_attempts=2, max_actor_restarts=3)
    first, second = s.next_tickets()
    assert s.actor_died(first, "worker died") is True  # probe it: Ray is restarting it
    assert s.actor_died(second, "worker died") is False  # a casualty of the same death
    assert s.next_tickets() == []  # no work for an actor until it answers again
    assert [(t.shard.shard_id, t.attempt) for t in s.queue] == [("s1", 1), ("s0", 2), ("s2", 1)]
    s.actor_back(0)
    again = s.next_tickets()
    assert [(t.task.shard.shard_id, t.task.attempt) for t in again] == [("s1", 1), ("s0", 2)]
    for t in again:
        s.succeeded(t, result(t))
    (last,) = s.next_tickets()
    s.succeeded(last, result(last))
    assert s.finished and not s.failed and len(s.results) == 3


def test_an_actor_that_keeps_dying_leaves_the_pool_and_its_work_moves_on():
    s = ShardScheduler(shards(2), actors=2, max_attempts=5, max_actor_restarts=1)
    a, b = s.next_tickets()
    assert {a.actor, b.actor} == {0, 1}
    bad = a if a.actor == 0 else b
    good = b if bad is a else a
    assert s.actor_died(bad, "worker died")
    s.actor_back(0)
    (retry,) = s.next_tickets()
    assert retry.actor == 0  # back in the pool after its restart, least loaded
    assert not s.actor_died(retry, "worker died")  # second death > max_actor_restarts: out
    assert s.ready_actors() == [1]
    (moved,) = s.next_tickets()
    assert moved.actor == 1 and moved.task.shard == bad.task.shard and moved.task.attempt == 3
    for t in (good, moved):
        s.succeeded(t, result(t))
    assert s.finished and not s.failed


def test_every_actor_gone_with_work_left_is_job_failed():
    s = ShardScheduler(shards(3), actors=1, max_attempts=5, max_actor_restarts=0)
    first, second = s.next_tickets()
    assert not s.actor_died(first, "worker died")  # no restarts allowed: gone at once
    s.actor_died(second, "worker died")
    assert s.finished
    with pytest.raises(JobFailed, match="3 shard\\(s\\) left with no actor"):
        s.check_stranded()


def test_an_actor_gone_for_good_during_its_restart():
    s = ShardScheduler(shards(1), actors=2, max_attempts=3, max_actor_restarts=3)
    (t,) = s.next_tickets()
    assert s.actor_died(t, "worker died")
    s.actor_gone(t.actor, "ActorDiedError")
    assert s.ready_actors() == [1 - t.actor]
    (again,) = s.next_tickets()
    assert again.actor == 1 - t.actor and again.task.attempt == 2


def test_limit_budget_reserves_samples_in_flight_and_stops_when_used_up():
    s = ShardScheduler(shards(5, samples=4), actors=2, max_attempts=3, max_actor_restarts=1, budget=10)
    tickets = s.next_tickets()
    # 10 samples allowed, 4 per shard: reserve 4 + 4 + 2; the third shard may read at most 2
    assert [t.reserved for t in tickets] == [4, 4, 2]
    assert [t.task.max_samples for t in tickets] == [10, 6, 2]
    for t, n in zip(tickets, (4, 4, 2)):
        s.succeeded(t, result(t, n))
    assert s.budget == 0
    assert s.next_tickets() == [] and not s.queue and s.finished  # the rest is not started


def test_a_failed_task_gives_its_budget_reservation_back():
    s = ShardScheduler(shards(2, samples=4), actors=1, max_attempts=3, max_actor_restarts=1, budget=6, per_actor=1)
    (t,) = s.next_tickets()
    assert t.reserved == 4
    s.task_failed(t, "boom")
    (retry,) = s.next_tickets()
    assert retry.task.shard.shard_id == "s0" and retry.task.attempt == 2 and retry.task.max_samples == 6


class _Rng:
    """Jitter pinned to its largest factor, so pauses are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_storage_unavailable_costs_no_attempt_and_pauses_with_growing_backoff():
    s = ShardScheduler(shards(3), actors=1, max_attempts=1, max_actor_restarts=0, storage_patience=100,
                       backoff=(1.0, 4.0), rng=_Rng())
    first, second = s.next_tickets(now=0.0)
    s.storage_unavailable(first, "http://s3:9000", "EndpointConnectionError", now=10.0)
    assert s.paused_until == 11.0 and s.outage_since == 10.0
    s.storage_unavailable(second, "http://s3:9000", "EndpointConnectionError", now=10.5)  # same pause
    assert s.paused_until == 11.0
    assert [(t.shard.shard_id, t.attempt) for t in s.queue] == [("s1", 1), ("s0", 1), ("s2", 1)]  # nothing lost
    assert s.next_tickets(now=10.9) == []  # paused
    (probe,) = s.next_tickets(now=11.0)  # one shard probes the store, the rest wait
    assert probe.task.shard.shard_id == "s1" and probe.task.attempt == 1
    pauses = []
    for now in (12.0, 20.0, 40.0):
        s.storage_unavailable(probe, "http://s3:9000", "EndpointConnectionError", now=now)
        pauses.append(s.paused_until - now)
        (probe,) = s.next_tickets(now=s.paused_until)
    assert pauses == [2.0, 4.0, 4.0]  # doubling up to the longest pause
    assert not s.failed and s.shard_retries == 0 and s.storage_requeues == 5
    s.succeeded(probe, result(probe), now=45.0)  # the store answers again: all work resumes
    assert s.outage_since is None and len(s.next_tickets(now=45.0)) == 2


def test_jitter_keeps_pauses_between_half_and_all_of_the_backoff():
    s = ShardScheduler(shards(1), actors=1, max_attempts=3, max_actor_restarts=0, backoff=(8.0, 8.0),
                       storage_patience=1000)
    pauses, now = [], 0.0
    for _ in range(20):
        (t,) = s.next_tickets(now=now)
        s.storage_unavailable(t, "e", "down", now=now)
        pauses.append(s.paused_until - now)
        now = s.paused_until
    assert all(4.0 <= p <= 8.0 for p in pauses) and len(set(pauses)) > 10  # spread: workers do not stampede


def test_storage_outage_past_the_patience_stops_the_run_with_the_endpoint_named():
    s = ShardScheduler(shards(2), actors=1, max_attempts=3, max_actor_restarts=0, storage_patience=30,
                       backoff=(1.0, 4.0))
    for t in s.next_tickets(now=0.0):
        s.storage_unavailable(t, "http://10.0.0.5:9000", "EndpointConnectionError: refused", now=100.0)
    now = 100.0
    with pytest.raises(StorageOutage, match=r"http://10\.0\.0\.5:9000 has been unavailable for 3\d s.*"
                                            r"--storage-patience.*rerun the same command"):
        while True:
            now = max(now + 1.0, s.paused_until)
            (t,) = s.next_tickets(now=now)
            s.storage_unavailable(t, "http://10.0.0.5:9000", "EndpointConnectionError: refused", now=now)
    assert not s.failed and s.shard_retries == 0


def test_shard_retries_count_attempts_beyond_the_first():
    s = ShardScheduler(shards(2), actors=1, max_attempts=3, max_actor_restarts=3)
    a, b = s.next_tickets()
    s.task_failed(a, "boom")
    assert s.actor_died(b, "worker died")
    assert s.shard_retries == 2


def test_actors_added_while_running_join_after_their_readiness_probe():
    s = ShardScheduler(shards(6), actors=1, max_attempts=3, max_actor_restarts=1)
    assert len(s.next_tickets()) == 2
    new = s.add_actor()
    assert new == 1 and s.live_actors() == 2 and s.ready_actors() == [0]
    assert s.next_tickets() == []  # not before it answers
    s.actor_back(new)
    assert [t.actor for t in s.next_tickets()] == [1, 1]


def test_a_shard_that_finds_storage_down_while_it_serves_others_loses_an_attempt():
    s = ShardScheduler(shards(2), actors=1, max_attempts=3, max_actor_restarts=0, backoff=(1.0, 1.0))
    bad, good = s.next_tickets(now=0.0)
    s.storage_unavailable(bad, "e", "InternalError", now=1.0)  # could be an outage: free
    s.succeeded(good, result(good), now=1.5)  # ... but the store answers the others
    (bad,) = s.next_tickets(now=2.0)
    assert bad.task.attempt == 1 and bad.task.storage_waits == 1
    s.storage_unavailable(bad, "e", "InternalError", now=3.0)
    (again,) = s.next_tickets(now=3.0)  # not paused: a shard failure, not an outage
    assert again.task.attempt == 2 and s.shard_retries == 1 and s.outage_since is None
