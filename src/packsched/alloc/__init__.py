"""Allocs: the local executor and the slice of this machine it runs attempts in."""

from __future__ import annotations

from .local import ExecutorConfig as ExecutorConfig
from .local import LocalAlloc as LocalAlloc
from .local import LocalExecutor as LocalExecutor

__all__ = ["ExecutorConfig", "LocalAlloc", "LocalExecutor"]
