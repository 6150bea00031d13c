"""The OpenAPI 3.1 document of the HTTP API, with schemas generated from the wire types."""

from __future__ import annotations

import functools
from importlib.metadata import version
from typing import Any

import msgspec

from ..stats.snapshot import StatsSnapshot
from ..task import Task
from .models import (
    ErrorBody,
    HistoryResponse,
    PriorityRequest,
    RunDetail,
    RunKillResponse,
    RunList,
    SubmitRequest,
    SubmitResponse,
    TaskList,
    WaitRequest,
    WaitResponse,
)

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{name}"


def _ref(cls: type) -> dict[str, Any]:
    return {"$ref": _REF.format(name=cls.__name__)}


def _body(cls: type) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(cls)}}}


def _ok(cls: type, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(cls)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "invalid input; `error.path` names the field",
        401: "missing or wrong bearer token",
        404: "no such task or run",
        409: "the control is not allowed in the task's state",
        413: "body or batch too large",
        503: "draining: the daemon is shutting down",
    }
    return {str(s): _ok(ErrorBody, reasons[s]) for s in (401, *statuses)}


def _query(
    name: str, description: str, schema: dict[str, Any], *, many: bool = False
) -> dict[str, Any]:
    if many:
        schema = {"type": "array", "items": schema}
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_TASK_ID = _path("task_id")
_STATE = {
    "type": "string",
    "enum": [
        "waiting",
        "hold",
        "staging",
        "running",
        "lost",
        "complete",
        "error",
        "failed",
        "killed",
        "skipped",
    ],
}


def _control(action: str, summary: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"{action}_task",
            "summary": summary,
            "parameters": [_TASK_ID],
            "responses": {"200": _ok(Task), **_errors(404, 409)},
        }
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The document served at `/openapi.json` (built once)."""
    types = [
        SubmitRequest,
        SubmitResponse,
        WaitRequest,
        WaitResponse,
        PriorityRequest,
        TaskList,
        RunList,
        RunDetail,
        RunKillResponse,
        HistoryResponse,
        ErrorBody,
        StatsSnapshot,
        Task,
    ]
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    paths: dict[str, Any] = {
        "/v1/tasks": {
            "post": {
                "operationId": "submit_tasks",
                "summary": "Submit a batch of task specs, all or nothing; idempotent by `key`.",
                "requestBody": _body(SubmitRequest),
                "responses": {"200": _ok(SubmitResponse), **_errors(400, 413, 503)},
            },
            "get": {
                "operationId": "list_tasks",
                "summary": "A page of tasks in submission order.",
                "parameters": [
                    _query(
                        "state", "only these states (repeat or comma-separate)", _STATE, many=True
                    ),
                    _query(
                        "label",
                        "key=value, repeatable; all must match",
                        {"type": "string"},
                        many=True,
                    ),
                    _query("run", "only this run", {"type": "string"}),
                    _query("kind", "only this kind", {"type": "string"}),
                    _query(
                        "after", "cursor: `next_cursor` of the previous page", {"type": "integer"}
                    ),
                    _query("limit", "page size, 1..1000 (default 100)", {"type": "integer"}),
                ],
                "responses": {"200": _ok(TaskList), **_errors(400)},
            },
        },
        "/v1/tasks/{task_id}": {
            "get": {
                "operationId": "get_task",
                "summary": "One task.",
                "parameters": [_TASK_ID],
                "responses": {"200": _ok(Task), **_errors(404)},
            }
        },
        "/v1/tasks/{task_id}/hold": _control("hold", "Hold a waiting task."),
        "/v1/tasks/{task_id}/release": _control("release", "Release a held task."),
        "/v1/tasks/{task_id}/kill": _control("kill", "Kill a task."),
        "/v1/tasks/{task_id}/retry": _control("retry", "Retry a task in ERROR."),
        "/v1/tasks/{task_id}/priority": {
            "post": {
                "operationId": "set_priority",
                "summary": "Change a task's priority (lower runs first).",
                "parameters": [_TASK_ID],
                "requestBody": _body(PriorityRequest),
                "responses": {"200": _ok(Task), **_errors(400, 404, 409)},
            }
        },
        "/v1/wait": {
            "post": {
                "operationId": "wait",
                "summary": "Long-poll until all or the first of the ids settle (timeout capped).",
                "requestBody": _body(WaitRequest),
                "responses": {"200": _ok(WaitResponse), **_errors(400, 404)},
            }
        },
        "/v1/runs": {
            "get": {
                "operationId": "list_runs",
                "summary": "Every run with its derived state.",
                "responses": {"200": _ok(RunList), **_errors()},
            }
        },
        "/v1/runs/{run}": {
            "get": {
                "operationId": "get_run",
                "summary": "One run and its tasks.",
                "parameters": [_path("run")],
                "responses": {"200": _ok(RunDetail), **_errors(404)},
            }
        },
        "/v1/runs/{run}/kill": {
            "post": {
                "operationId": "kill_run",
                "summary": "Kill every task of a run that can still be killed.",
                "parameters": [_path("run")],
                "responses": {"200": _ok(RunKillResponse), **_errors(404)},
            }
        },
        "/v1/stats": {
            "get": {
                "operationId": "stats",
                "summary": "The statistics snapshot.",
                "parameters": [
                    _query("tasks", "include per-task rows (default true)", {"type": "boolean"})
                ],
                "responses": {"200": _ok(StatsSnapshot), **_errors()},
            }
        },
        "/v1/history": {
            "get": {
                "operationId": "history",
                "summary": "Finished attempts, oldest first.",
                "parameters": [
                    _query("task_id", "one task", {"type": "string"}),
                    _query("kind", "one kind", {"type": "string"}),
                    _query("run", "one run", {"type": "string"}),
                    _query("state", "one final state", _STATE),
                    _query("since", "finished at or after (epoch seconds)", {"type": "number"}),
                    _query("until", "finished before (epoch seconds)", {"type": "number"}),
                    _query("limit", "at most this many, 1..10000", {"type": "integer"}),
                ],
                "responses": {"200": _ok(HistoryResponse), **_errors(400)},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "packsched", "version": version("packsched")},
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
