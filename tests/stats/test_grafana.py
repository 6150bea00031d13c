"""The Grafana dashboard only queries metrics that packsched exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from packsched.resources import GiB, Resources
from packsched.stats.prometheus import render_metrics
from packsched.stats.recorder import StatsRecorder
from packsched.stats.snapshot import AllocStats, StatsSnapshot
from packsched.task import TaskState

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "packsched.json"


def exported_names() -> set[str]:
    """Every sample name a scrape of a busy scheduler shows (per-task series excluded)."""
    res = Resources(cpu=4, mem=8 * GiB)
    snap = StatsSnapshot(
        taken_at=10.0,
        total_allocs=1,
        total_tasks=0,
        tasks_by_state=dict.fromkeys(TaskState, 0),
        allocs=[
            AllocStats(
                id="a1",
                resources=res,
                available=res,
                dead=False,
                task_ids=[],
                labels={},
                created_at=0.0,
                idle_since=5.0,
            )
        ],
        tasks=[],
        pending_alloc_requests=1,
        pending_alloc_resources=res,
        counters=StatsRecorder().counters(),
    )
    text = render_metrics(snap).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_queries_only_exported_metrics() -> None:
    """Every packsched_ name in a panel query is one the collector exports."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"packsched_[a-z0-9_]+", expr)}
    assert used <= exported_names(), used - exported_names()
    assert {p["id"] for p in dashboard["panels"]} == set(range(1, len(dashboard["panels"]) + 1))
