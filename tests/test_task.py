"""Task specs and the transition table."""

from __future__ import annotations

import pytest

from packsched import InvalidSpecError, InvalidTransition, Resources, TaskSpec, TaskState
from packsched.task import TRANSITIONS, check_transition, decode_specs, stage

S = TaskState


def test_table_matches_design() -> None:
    """Every row of DESIGN §3 is present, terminal states lead nowhere."""
    assert set(TRANSITIONS[S.WAITING]) == {S.HOLD, S.STAGING, S.ERROR, S.KILLED, S.SKIPPED}
    assert set(TRANSITIONS[S.RUNNING]) == {S.LOST, S.COMPLETE, S.ERROR, S.KILLED}
    assert set(TRANSITIONS[S.LOST]) == {S.WAITING, S.FAILED}
    assert set(TRANSITIONS[S.ERROR]) == {S.WAITING, S.FAILED, S.KILLED}
    for terminal in (S.COMPLETE, S.FAILED, S.KILLED, S.SKIPPED):
        assert TRANSITIONS[terminal] == {}


def test_illegal_transition_names_both_states() -> None:
    """An illegal change raises InvalidTransition naming the task and both states."""
    with pytest.raises(InvalidTransition) as info:
        check_transition("abc", S.COMPLETE, S.WAITING, "retry")
    assert "complete -> waiting" in str(info.value) and "abc" in str(info.value)


def test_stage_order() -> None:
    """WAITING/HOLD < STAGING < RUNNING < settled."""
    assert stage(S.HOLD) == stage(S.WAITING) < stage(S.STAGING) < stage(S.RUNNING) < stage(S.ERROR)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'[{"command": []}]', "$[0]"),
        (b'[{"command": ["x"], "resources": {"cpu": -1}}]', "$[0].resources"),
        (b'[{"command": ["x"]}, {"command": ["y"], "colour": 1}]', "$[1]"),
        (b'[{"command": ["x"], "after": ["nope"]}]', "$[0]"),
        (b'[{"command": ["x"], "timeout": 0}]', "$[0]"),
        (b'[{"command": ["x"], "priority": "high"}]', "$[0].priority"),
        (b'{"command": 1}', "$"),
    ],
)
def test_decode_errors_carry_path(body: bytes, path: str) -> None:
    """Bad specs are rejected with the JSON path of the fault."""
    with pytest.raises(InvalidSpecError) as info:
        decode_specs(body)
    assert info.value.path == path


def test_spec_defaults_kind_to_name() -> None:
    """kind defaults to name."""
    spec = TaskSpec(command=["echo"], name="align", resources=Resources(cpu=1))
    assert spec.kind == "align"
    with pytest.raises(ValueError, match="command"):
        TaskSpec(command=[])


def test_invalid_spec_error_is_value_error() -> None:
    """InvalidSpecError is also a ValueError, for callers that catch those."""
    assert issubclass(InvalidSpecError, ValueError)
