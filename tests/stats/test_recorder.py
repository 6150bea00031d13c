"""Tests of the scheduler's event counters and histograms."""

from __future__ import annotations

import math

import pytest

from packsched.stats.recorder import SECONDS_BUCKETS, HistogramRecorder, StatsRecorder


def test_counters_start_at_zero_with_empty_histograms() -> None:
    """A fresh recorder reports zeros and histograms with every bound and +Inf."""
    c = StatsRecorder().counters()
    assert c.submitted == 0
    assert c.finished == {}
    assert c.queue_wait_seconds is not None
    assert c.queue_wait_seconds.bounds == [*SECONDS_BUCKETS, math.inf]
    assert c.queue_wait_seconds.buckets == [0] * (len(SECONDS_BUCKETS) + 1)


def test_events_are_counted() -> None:
    """Each event method moves its own total."""
    r = StatsRecorder()
    r.task_submitted(3)
    r.task_submitted()
    r.task_finished("complete", 0.2, 1.0)
    r.task_finished("complete", None, None)
    r.task_finished("error", 0.1, 0.1)
    r.task_lost()
    r.task_retried()
    r.alloc_requested()
    r.alloc_requested()
    r.alloc_request_failed()
    r.alloc_started()
    r.alloc_freed(dead=False)
    r.alloc_freed(dead=True)
    c = r.counters()
    assert c.submitted == 4
    assert c.finished == {"complete": 2, "error": 1}
    assert (c.lost, c.retried) == (1, 1)
    assert (c.alloc_requests, c.alloc_requests_failed, c.allocs_started) == (2, 1, 1)
    assert (c.allocs_freed, c.allocs_dead) == (2, 1)
    assert c.run_seconds is not None
    assert c.run_seconds.count == 2
    assert c.run_seconds.sum == pytest.approx(1.1)


def test_histogram_is_cumulative_and_inclusive_of_bounds() -> None:
    """An observation equal to a bound counts in that bucket (Prometheus `le`)."""
    h = HistogramRecorder([1.0, 2.0])
    for v in (0.5, 1.0, 1.5, 7.0, -1.0, math.nan):
        h.observe(v)
    snap = h.snapshot()
    assert snap.bounds == [1.0, 2.0, math.inf]
    assert snap.buckets == [3, 4, 5]
    assert snap.count == 5
    assert snap.sum == pytest.approx(10.0)


def test_snapshot_is_a_copy() -> None:
    """A later event does not change a snapshot already taken."""
    r = StatsRecorder()
    r.task_finished("complete", 1.0, 1.0)
    before = r.counters()
    r.task_finished("complete", 1.0, 1.0)
    assert before.finished == {"complete": 1}
    assert r.counters().finished == {"complete": 2}


def test_bounds_must_increase() -> None:
    """Unsorted bounds are refused."""
    with pytest.raises(ValueError, match="strictly increasing"):
        HistogramRecorder([2.0, 1.0])
