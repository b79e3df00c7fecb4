"""The OpenAPI document (/openapi.json, /docs): FastAPI's, completed from the tables below.

FastAPI describes only its own routes, and those take their bodies as `Any`; rank, reward,
activate and the other hot-path operations are plain Starlette routes it does not see at all. So
the document is post-processed in one place: every route is listed under its endpoint's name as
operationId; OPERATIONS gives each its request body, success responses and every 4xx it can give
(with Personalizer's error body); each Personalizer path is repeated under /loops/{loop}; and
links tie created loops, keys, evaluations and ranked events to the operations that use them.
Contract: every answer the app gives has its status, headers and body documented here
(tests/api/test_fuzz.py checks that by fuzzing); an operation missing from OPERATIONS still gets
DEFAULT_ERRORS, and 408/413 are documented everywhere, 429/503 on rank, reward and activate.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Route

from service.api.openapi.operations import (
    ANY_REQUEST,
    DEFAULT_ERRORS,
    ERROR_TEXT,
    HOT,
    IN_LOOP,
    KEYED,
    OPERATIONS,
    Op,
)
from service.api.openapi.schemas import DESCRIPTION, JSON, SCHEMAS, STR, ref
from service.api.routes import loops


def install(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    """Serve `document(app, routes)` as the app's OpenAPI document (built on first request).
    `routes` are the routes of the routers the app includes (FastAPI's and plain Starlette's)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(app: FastAPI, routes: Sequence[BaseRoute]) -> dict[str, Any]:
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=DESCRIPTION,
        routes=routes,
    )
    paths: dict[str, dict[str, Any]] = doc["paths"]
    for route in routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            op = paths.setdefault(route.path, {}).setdefault(method.lower(), {})
            if not isinstance(route, APIRoute):  # a plain Starlette route FastAPI skipped
                op["parameters"] = [_path_param(p) for p in route.param_convertors]
            op["operationId"] = route.name
            for param in op.get("parameters", []):
                if param["in"] == "path" and param["schema"].get("type") == "string":
                    param["schema"]["pattern"] = LOOP_NAME if param["name"] == "name" else SEGMENT
            _complete(op, OPERATIONS.get(route.name))
    for path in [p for p in paths if p.startswith("/personalizer/")]:
        paths["/loops/{loop}" + path] = _in_named_loop(paths[path])
    _link(paths)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(copy.deepcopy(SCHEMAS))
    components["securitySchemes"] = {
        "apiKey": {"type": "apiKey", "in": "header", "name": "Ocp-Apim-Subscription-Key"},
        "bearer": {"type": "http", "scheme": "bearer"},
    }
    doc["security"] = [{"apiKey": []}, {"bearer": []}]
    return doc


# A path parameter is one path segment: a `/` in it (even %2F-encoded) reaches another route.
SEGMENT = "^[^/]+$"
LOOP_NAME = loops.NAME.pattern


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _complete(op: dict[str, Any], spec: Op | None) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    responses.pop("422", None)  # validation errors are 400 here (service.api.errors)
    if spec is None:
        errors = DEFAULT_ERRORS
        if not any(status.startswith("2") for status in responses):
            responses["2XX"] = {"description": "Success"}  # a plain Starlette route
    else:
        op["summary"] = spec.summary
        responses.clear()
        for status, content in spec.ok.items():
            responses[str(status)] = _success(status, content, spec.headers.get(status, {}))
        if spec.body is not None:
            op["requestBody"] = {"required": spec.body_required, "content": _content(spec.body)}
        else:
            op.pop("requestBody", None)
        op.setdefault("parameters", []).extend(
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in spec.query.items()
        )
        errors = _errors(spec)
        if spec.kind == "public":
            op["security"] = []
    for status, codes in sorted(errors.items()):
        responses[str(status)] = _error(status, codes)
    if spec is not None:
        op["tags"] = ["Personalizer" if spec.kind in ("loop", "hot") else "dloop"]


def _errors(spec: Op) -> dict[int, tuple[str, ...]]:
    common: dict[int, tuple[str, ...]] = dict(ANY_REQUEST)
    if spec.kind != "public":
        common.update(KEYED)
    if spec.kind in ("loop", "hot"):
        common.update(IN_LOOP)
    if spec.kind == "hot":
        common.update(HOT)
    for status, codes in spec.errors.items():
        common[status] = (*codes, *(c for c in common.get(status, ()) if c not in codes))
    return common


def _content(what: str | tuple[str, ...]) -> dict[str, Any]:
    if isinstance(what, tuple):
        return {media: {"schema": {"type": "string"}} for media in what}
    if what == "Model":
        return {"application/octet-stream": {"schema": ref(what)}}
    if what == "Records":  # NDJSON, documented as text (any content type is read)
        return {"text/plain": {"schema": ref(what)}}
    return {JSON: {"schema": ref(what)}}


def _success(
    status: int, content: str | tuple[str, ...] | None, headers: Mapping[str, str]
) -> dict[str, Any]:
    response: dict[str, Any] = {"description": ERROR_TEXT.get(status, "Success")}
    if content is not None:
        response["content"] = _content(content)
    if headers:
        response["headers"] = {
            name: {"description": text, "required": True, "schema": STR}
            for name, text in headers.items()
        }
    return response


def _error(status: int, codes: tuple[str, ...]) -> dict[str, Any]:
    text = ERROR_TEXT.get(status, "Error")
    if codes:
        text += ": " + ", ".join(f"`{c}`" for c in codes)
    headers: dict[str, Any] = {
        "x-ms-error-code": {"description": "the error code", "required": True, "schema": STR}
    }
    if status == 429:
        headers["Retry-After"] = {"description": "seconds", "required": True, "schema": STR}
    return {"description": text, "headers": headers, "content": _content("ErrorResponse")}


LOOP_PARAM = {
    "name": "loop",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": LOOP_NAME},
}


def _in_named_loop(item: dict[str, Any]) -> dict[str, Any]:
    """The same operations on a named loop: operationId `<name>_in_loop`, a `loop` parameter."""
    out = copy.deepcopy(item)
    for op in out.values():
        op["operationId"] += "_in_loop"
        op["parameters"] = [LOOP_PARAM, *op.get("parameters", [])]
    return out


# Links: (source operationId, its status, target operationIds, parameters, request body), for
# the default loop's operations and, carrying the loop along, for each `_in_loop` copy.
LINKS: list[tuple[str, int, tuple[str, ...], dict[str, str], Any]] = [
    (
        "rank",
        201,
        ("reward", "activate", "get_event"),
        {"event_id": "$response.body#/eventId"},
        None,
    ),
    (
        "rank_multi_slot",
        201,
        ("activate_multi_slot", "get_event"),
        {"event_id": "$response.body#/eventId"},
        None,
    ),
    (
        "rank_multi_slot",
        201,
        ("reward_multi_slot",),
        {"event_id": "$response.body#/eventId"},
        {"reward": [{"slotId": "$response.body#/slots/0/id", "value": 1}]},
    ),
    (
        "create_evaluation",
        200,
        ("get_evaluation", "delete_evaluation"),
        {"evaluation_id": "$request.path.evaluation_id"},
        None,
    ),
    (
        "create_evaluation_v1",
        201,
        ("get_evaluation", "delete_evaluation"),
        {"evaluation_id": "$response.body#/id"},
        None,
    ),
    (
        "get_evaluation",
        200,
        ("apply_from_evaluation",),
        {},
        {
            "evaluationId": "$request.path.evaluation_id",
            "policyName": "$response.body#/optimalPolicy",
        },
    ),
    (
        "create_feature_importance",
        200,
        ("get_feature_importance", "delete_feature_importance"),
        {"job_id": "$request.path.job_id"},
        None,
    ),
    ("create_client_key", 201, ("list_client_keys",), {"name": "$request.path.name"}, None),
    (
        "create_client_key",
        201,
        ("delete_client_key",),
        {"name": "$request.path.name", "key_id": "$response.body#/id"},
        None,
    ),
]


def _link(paths: dict[str, dict[str, Any]]) -> None:
    ops = {op["operationId"]: op for item in paths.values() for op in item.values()}
    for loop in ("", "_in_loop"):
        for source, status, targets, params, body in LINKS:
            if source + loop not in ops:
                continue
            carry = {"loop": "$request.path.loop"} if loop else {}
            for target in targets:
                if target + loop in ops:
                    _add_link(ops[source + loop], status, target + loop, {**carry, **params}, body)
    if "create_loop" not in ops:
        return
    # A created loop leads to every operation on it.
    for status in (200, 201):
        for target_id in ops:
            if target_id.endswith("_in_loop"):
                _add_link(ops["create_loop"], status, target_id, {"loop": "$request.path.name"})
            elif target_id in ("create_client_key", "list_client_keys", "delete_loop"):
                _add_link(ops["create_loop"], status, target_id, {"name": "$request.path.name"})


def _add_link(
    op: dict[str, Any], status: int, target: str, params: dict[str, str], body: Any = None
) -> None:
    link: dict[str, Any] = {"operationId": target, "parameters": params}
    if body is not None:
        link["requestBody"] = body
    op["responses"][str(status)].setdefault("links", {})[target] = link
