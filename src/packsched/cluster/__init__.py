"""Cluster providers: where allocs come from."""

from __future__ import annotations

from .base import Alloc as Alloc
from .base import Cluster as Cluster
from .kubernetes import KubernetesCluster as KubernetesCluster
from .local import LocalCluster as LocalCluster
from .process import ProcessCluster as ProcessCluster
from .sim import SimCluster as SimCluster
from .slurm import SlurmCluster as SlurmCluster

__all__ = [
    "Alloc",
    "Cluster",
    "KubernetesCluster",
    "LocalCluster",
    "ProcessCluster",
    "SimCluster",
    "SlurmCluster",
]
