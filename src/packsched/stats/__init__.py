"""Statistics: the snapshot, event totals, runtime measurement, history and Prometheus export."""

from __future__ import annotations

from .history import History as History
from .history import HistorySource as HistorySource
from .history import KindHistory as KindHistory
from .prometheus import MetricsServer as MetricsServer
from .prometheus import PackschedCollector as PackschedCollector
from .prometheus import metrics_app as metrics_app
from .prometheus import render_metrics as render_metrics
from .prometheus import start_metrics_server as start_metrics_server
from .recorder import StatsRecorder as StatsRecorder
from .snapshot import AllocStats as AllocStats
from .snapshot import Counters as Counters
from .snapshot import Histogram as Histogram
from .snapshot import StatsSnapshot as StatsSnapshot
from .snapshot import TaskStats as TaskStats

__all__ = [
    "AllocStats",
    "Counters",
    "Histogram",
    "History",
    "HistorySource",
    "KindHistory",
    "MetricsServer",
    "PackschedCollector",
    "StatsRecorder",
    "StatsSnapshot",
    "TaskStats",
    "metrics_app",
    "render_metrics",
    "start_metrics_server",
]
