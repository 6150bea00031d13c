"""Allocs: the local executor, the slice of this machine it runs attempts in, and the
agent-backed alloc of remote clusters."""

from __future__ import annotations

from .local import ExecutorConfig as ExecutorConfig
from .local import LocalAlloc as LocalAlloc
from .local import LocalExecutor as LocalExecutor
from .remote import RemoteAlloc as RemoteAlloc

__all__ = ["ExecutorConfig", "LocalAlloc", "LocalExecutor", "RemoteAlloc"]
