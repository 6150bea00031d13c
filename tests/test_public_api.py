"""The public names: what `__all__` promises is exactly what the packages export."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "packsched",
    "packsched.cluster",
    "packsched.store",
    "packsched.stats",
    "packsched.alloc",
    "packsched.api",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_matches_exports(name: str) -> None:
    """Every name in __all__ exists, and every public re-export is listed in __all__."""
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert all(hasattr(module, n) for n in exported)
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and not isinstance(v, type(importlib))  # submodules are not re-exports
        and n not in {"annotations"}
    }
    assert public - {"__version__"} == exported


def test_design_contract_names() -> None:
    """The names DESIGN §4 promises import from where it says."""
    from packsched import (  # noqa: F401
        GiB,
        InvalidTransition,
        MiB,
        Requirements,
        Resources,
        Scheduler,
        SchedulerConfig,
        TaskSpec,
        TaskState,
    )
    from packsched.cluster import LocalCluster, SimCluster  # noqa: F401
    from packsched.testing import ManualCluster  # noqa: F401
