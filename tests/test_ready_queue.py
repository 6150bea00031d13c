"""The scheduler's ready queue: always the live tasks in (priority, order) order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from packsched import Resources, TaskSpec, TaskState
from packsched.scheduler import _ReadyQueue, _TaskEntry
from packsched.task import Task

ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "discard", "iter", "compact"]),
        st.integers(0, 15),
        st.integers(-2, 2),
    ),
    max_size=80,
)


def _entry(i: int, priority: int, order: int) -> _TaskEntry:
    spec = TaskSpec(command=["x"], resources=Resources(cpu=1 + i % 3), priority=priority)
    task = Task(id=f"{i:016x}", spec=spec, state=TaskState.WAITING)
    return _TaskEntry(task=task, visible=task, order=order)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_iteration_is_the_sorted_live_set(script: list[tuple[str, int, int]]) -> None:
    """Whatever the adds (re-adds with a new priority), discards and compactions, iteration
    yields exactly the live tasks, each once, by (priority, order)."""
    queue = _ReadyQueue()
    model: dict[str, _TaskEntry] = {}
    order = 0
    for op, i, priority in script:
        task_id = f"{i:016x}"
        if op == "add":
            order += 1
            entry = _entry(i, priority, order if i % 2 else -order)
            queue.add(entry)
            model[task_id] = entry
        elif op == "discard":
            queue.discard(task_id)
            model.pop(task_id, None)
        elif op == "compact":
            queue.compact()
        else:
            # A partial iteration (as a placement window does) must not disturb later ones.
            next(iter(queue), None)
        expected = sorted(model.values(), key=lambda e: (e.task.spec.priority, e.order))
        assert list(queue) == expected
        assert len(queue) == len(model)
        if model:
            assert queue.floor is not None
            assert all(queue.floor.fits_in(e.task.spec.resources) for e in model.values())
