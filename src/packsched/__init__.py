"""packsched: an asyncio bin-packing scheduler daemon.

Public names, re-exported explicitly; nothing is defined here.
"""

from __future__ import annotations

from .clock import Clock as Clock
from .cluster.base import Alloc as Alloc
from .cluster.base import Cluster as Cluster
from .errors import AllocationError as AllocationError
from .errors import InvalidSpecError as InvalidSpecError
from .errors import InvalidTransition as InvalidTransition
from .errors import PackschedError as PackschedError
from .errors import StoreError as StoreError
from .errors import TaskNotFoundError as TaskNotFoundError
from .resources import AllocShape as AllocShape
from .resources import GiB as GiB
from .resources import KiB as KiB
from .resources import MiB as MiB
from .resources import PiB as PiB
from .resources import Requirements as Requirements
from .resources import Resources as Resources
from .resources import TiB as TiB
from .scheduler import Scheduler as Scheduler
from .scheduler import SchedulerClosedError as SchedulerClosedError
from .scheduler import SchedulerConfig as SchedulerConfig
from .stats.snapshot import StatsSnapshot as StatsSnapshot
from .task import RuntimeStatistics as RuntimeStatistics
from .task import Task as Task
from .task import TaskError as TaskError
from .task import TaskOutput as TaskOutput
from .task import TaskResult as TaskResult
from .task import TaskSpec as TaskSpec
from .task import TaskState as TaskState

__all__ = [
    "Alloc",
    "AllocShape",
    "AllocationError",
    "Clock",
    "Cluster",
    "GiB",
    "InvalidSpecError",
    "InvalidTransition",
    "KiB",
    "MiB",
    "PackschedError",
    "PiB",
    "Requirements",
    "Resources",
    "RuntimeStatistics",
    "Scheduler",
    "SchedulerClosedError",
    "SchedulerConfig",
    "StatsSnapshot",
    "StoreError",
    "Task",
    "TaskError",
    "TaskNotFoundError",
    "TaskOutput",
    "TaskResult",
    "TaskSpec",
    "TaskState",
    "TiB",
]
__version__ = "0.1.0"
