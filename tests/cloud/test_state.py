"""The state table: event markers, counters, training locks (moto DynamoDB)."""

from __future__ import annotations

import pytest

from chalicelib.state import LOCK_MARGIN_SECONDS, StateStore, event_key
from tests.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(aws, settings, clock) -> StateStore:
    return StateStore(settings.state_table, aws.dynamodb, clock=clock)


def test_mark_event_once_is_true_only_the_first_time_and_sets_ttl(state, aws, settings, clock):
    assert state.mark_event_once("bucket/raw/a#seq1") is True
    assert state.mark_event_once("bucket/raw/a#seq1") is False
    assert state.mark_event_once("bucket/raw/a#seq2") is True
    item = aws.dynamodb.get_item(
        TableName=settings.state_table, Key={"pk": {"S": event_key("bucket/raw/a#seq1")}}
    )["Item"]
    assert int(item["expires_at"]["N"]) == int(clock.now) + 7 * 86400


def test_counter_adds_atomically_and_consume_keeps_later_records(state):
    assert state.new_records("m") == 0
    assert state.add_new_records("m", 40) == 40
    assert state.add_new_records("m", 2) == 42
    started_with = state.new_records("m")
    state.add_new_records("m", 5)  # arrives while the training runs
    assert state.consume_new_records("m", started_with) == 5
    assert state.new_records("m") == 5
    assert state.new_records("other") == 0


def test_consume_never_goes_below_zero(state):
    state.add_new_records("m", 3)
    assert state.consume_new_records("m", 10) == 0
    assert state.consume_new_records("m", 0) == 0


def test_adds_from_separate_writers_lose_nothing(state, aws, settings):
    # Two Lambda containers adding interleaved: the count is a server-side ADD, not a
    # client read-modify-write, so neither writer's view can overwrite the other's.
    # (moto's DynamoDB does not serialise threads, so real concurrency is not testable here.)
    other = StateStore(settings.state_table, aws.dynamodb)
    totals = []
    for _ in range(10):
        totals.append(state.add_new_records("m", 1))
        totals.append(other.add_new_records("m", 2))
    assert totals == [n for i in range(10) for n in (3 * i + 1, 3 * i + 3)]
    assert state.new_records("m") == other.new_records("m") == 30


def test_count_event_records_counts_each_event_once(state):
    assert state.count_event_records("e1", "m", 7) == 7
    assert state.count_event_records("e1", "m", 7) is None
    assert state.count_event_records("e2", "m", 3) == 10
    assert state.new_records("m") == 10


def test_lock_is_exclusive_and_released_only_by_its_holder(state, clock):
    assert state.acquire_training_lock("m", 1, "job-1", max_runtime_seconds=600) is True
    assert state.acquire_training_lock("m", 2, "job-2", max_runtime_seconds=600) is False
    lock = state.training_lock("m")
    assert lock is not None
    assert (lock.version, lock.job_name) == (1, "job-1")
    assert lock.stale_at == clock.now + 600 + LOCK_MARGIN_SECONDS
    assert state.release_training_lock("m", 2) is False
    assert state.training_lock("m") is not None
    assert state.release_training_lock("m", 1) is True
    assert state.training_lock("m") is None
    assert state.release_training_lock("m", 1) is False
    # Locks are per model.
    assert state.acquire_training_lock("m", 3) is True
    assert state.acquire_training_lock("n", 1) is True


def test_stale_lock_can_be_taken_over_once(state, clock):
    assert state.acquire_training_lock("m", 1, "job-1", max_runtime_seconds=600)
    clock.now += 600 + LOCK_MARGIN_SECONDS - 1
    assert state.acquire_training_lock("m", 2, "job-2", max_runtime_seconds=600) is False
    clock.now += 1
    assert state.training_lock("m").is_stale(clock.now)
    assert state.acquire_training_lock("m", 2, "job-2", max_runtime_seconds=600) is True
    # The taker's lock is fresh: a second taker at the same moment loses.
    assert state.acquire_training_lock("m", 3, "job-3", max_runtime_seconds=600) is False
    # The old holder's late completion cannot release the new holder's lock.
    assert state.release_training_lock("m", 1) is False
    assert state.training_lock("m").version == 2


def test_set_lock_job_only_for_the_holder(state):
    assert state.acquire_training_lock("m", 4)
    assert state.set_lock_job("m", 4, "mledge-m-v4-abc") is True
    assert state.set_lock_job("m", 5, "other") is False
    assert state.training_lock("m").job_name == "mledge-m-v4-abc"
    assert state.set_lock_job("absent", 1, "x") is False


def test_consume_notes_the_training_start_for_the_schedule(state, clock):
    assert state.last_training_started_at("m") is None
    state.add_new_records("m", 4)
    state.consume_new_records("m", 4, version=2)
    assert state.last_training_started_at("m") == int(clock.now)
    clock.now += 100
    state.consume_new_records("m", 0, version=3)  # a forced training with no new data
    assert state.last_training_started_at("m") == int(clock.now)
    assert state.new_records("m") == 0
