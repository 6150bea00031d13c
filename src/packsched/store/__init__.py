"""The durable log of tasks, attempts and allocs: the protocol and its two stores."""

from __future__ import annotations

from .base import AllocRecord as AllocRecord
from .base import HistoryQuery as HistoryQuery
from .base import Store as Store
from .base import StoreBatch as StoreBatch
from .memory import MemoryStore as MemoryStore
from .sqlite import Durability as Durability
from .sqlite import SQLiteStore as SQLiteStore
from .sqlite import StoreStatistics as StoreStatistics

__all__ = [
    "AllocRecord",
    "Durability",
    "HistoryQuery",
    "MemoryStore",
    "SQLiteStore",
    "Store",
    "StoreBatch",
    "StoreStatistics",
]
