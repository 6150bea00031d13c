"""Cluster providers: where allocs come from."""

from __future__ import annotations

from .base import Alloc as Alloc
from .base import Cluster as Cluster
from .local import LocalCluster as LocalCluster
from .sim import SimCluster as SimCluster

__all__ = ["Alloc", "Cluster", "LocalCluster", "SimCluster"]
