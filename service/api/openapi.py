"""The OpenAPI document (/openapi.json, /docs): FastAPI's, completed from the tables below.

FastAPI describes only its own routes, and those take their bodies as `Any`; rank, reward,
activate and the other hot-path operations are plain Starlette routes it does not see at all. So
the document is post-processed in one place: every route is listed under its endpoint's name as
operationId; OPERATIONS gives each its request body, success responses and every 4xx it can give
(with Personalizer's error body); each Personalizer path is repeated under /loops/{loop}; and
links tie created loops, keys, evaluations and ranked events to the operations that use them.
Contract: every answer the app gives has its status, headers and body documented here
(tests/test_fuzz.py checks that by fuzzing); an operation missing from OPERATIONS still gets
DEFAULT_ERRORS, and 408/413 are documented everywhere, 429/503 on rank, reward and activate.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Route

from learners.joiner import AGGREGATIONS
from service.api.routes import loops
from service.core.schemas import PolicyContract, ServiceConfiguration

DESCRIPTION = """\
Wire-compatible with Azure AI Personalizer. Every `/personalizer/...` path is also served as
`/personalizer/v1.0/...`, `/personalizer/v1.1-preview.N/...` and `/personalizer/...?api-version=...`
(v1.0's `GET /evaluations` answers a bare array), and for a named loop under
`/loops/{loop}/personalizer/...` (listed below; `/personalizer/...` is the loop `default`).
Keys go in `Ocp-Apim-Subscription-Key` or `Authorization: Bearer`. Every error is
`{"error": {"code", "message"}}` with the code also in the `x-ms-error-code` header; each error
response below lists the codes it can carry.
"""

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: tuple[str, ...] = (), **properties: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        doc["required"] = list(required)
    return doc


def _list_of(item: dict[str, Any]) -> dict[str, Any]:
    return _obj(("value",), value={"type": "array", "items": item})


def _service_configuration() -> dict[str, Any]:
    doc = ServiceConfiguration.model_json_schema(by_alias=True)
    # A validator, not the type, limits it (case-insensitively; answered in lower case).
    doc["properties"]["rewardAggregation"]["enum"] = list(AGGREGATIONS)
    return doc


STR = {"type": "string"}
ID = {"type": "string", "minLength": 1, "maxLength": 256}
NUM = {"type": "number"}
TIME = {"type": "string", "format": "date-time"}
REWARD = {"type": "number", "minimum": -1, "maximum": 1}
FEATURES = {
    "type": "array",
    "description": "Feature objects: an object value is a namespace (holding features the same "
    "way); keys starting with `_` are ignored.",
    "items": {
        "type": "object",
        "propertyNames": {"minLength": 1},
        "additionalProperties": {
            "anyOf": [
                {"type": ["string", "number", "boolean", "null"]},
                {"type": "array", "items": NUM},
                {"type": "object", "propertyNames": {"minLength": 1}},
            ]
        },
    },
}
ACTIONS = {
    "type": "array",
    "minItems": 1,
    "items": _obj(("id", "features"), id=ID, features=FEATURES),
}
RANKED = _obj(("id", "probability"), id=STR, probability={**NUM, "minimum": 0, "maximum": 1})
EXPLANATION = {
    "type": "array",
    "items": _obj(
        ("id", "features"),
        id=STR,
        features={"type": "array", "items": _obj(("name", "score"), name=STR, score=NUM)},
    ),
}
JOB = {
    "id": STR,
    "name": STR,
    "startTime": TIME,
    "endTime": TIME,
    "creationTime": TIME,
    "status": STR,
    "progress": {**NUM, "minimum": 0, "maximum": 1},
    "description": STR,
}
JOB_REQUIRED = ("id", "name", "startTime", "endTime", "creationTime", "status")
WINDOW = {"name": ID, "startTime": TIME, "endTime": TIME}
LOOP = _obj(
    ("name", "kind", "createdTime"), name=STR, kind={"enum": ["cb", "ccb", "rl"]}, createdTime=TIME
)
NULLABLE_STR = {"type": ["string", "null"]}
KEY = {
    "id": {"type": "integer"},
    "role": STR,
    "label": NULLABLE_STR,
    "source": NULLABLE_STR,
    "createdTime": TIME,
    "expiresTime": {"type": ["string", "null"], "format": "date-time"},
}
KEY_FIELDS = ("id", "role", "label", "source", "createdTime", "expiresTime")
SECRET = {"type": "string", "description": "shown once: only its hash is stored"}

SCHEMAS: dict[str, dict[str, Any]] = {
    "ErrorResponse": _obj(("error",), error=_obj(("code", "message"), code=STR, message=STR)),
    "RankRequest": _obj(
        ("actions",),
        contextFeatures=FEATURES,
        actions=ACTIONS,
        excludedActions={"type": "array", "items": STR},
        eventId=ID,
        deferActivation={"type": "boolean"},
        episodeId={**ID, "description": "dloop, loops of kind rl: the episode this step is in"},
    ),
    "RankResponse": _obj(
        ("ranking", "eventId", "rewardActionId"),
        ranking={"type": "array", "items": RANKED},
        eventId=STR,
        rewardActionId=STR,
        inferenceExplanation=EXPLANATION,
    ),
    "RewardRequest": _obj(("value",), value=REWARD),
    "EpisodeEnd": _obj(terminated={"type": "boolean", "default": True}),
    "MultiSlotRankRequest": _obj(
        ("actions", "slots"),
        contextFeatures=FEATURES,
        actions=ACTIONS,
        slots={
            "type": "array",
            "minItems": 1,
            "items": _obj(
                ("id", "baselineAction"),
                id=ID,
                baselineAction=STR,
                features=FEATURES,
                excludedActions={"type": "array", "items": STR},
            ),
        },
        eventId=ID,
        deferActivation={"type": "boolean"},
    ),
    "MultiSlotRankResponse": _obj(
        ("eventId", "slots"),
        eventId=STR,
        slots={
            "type": "array",
            "items": _obj(("id", "rewardActionId"), id=STR, rewardActionId=STR, probability=NUM),
        },
    ),
    "MultiSlotRewardRequest": _obj(
        ("reward",),
        reward={
            "type": "array",
            "minItems": 1,
            "items": _obj(("slotId", "value"), slotId=ID, value=REWARD),
        },
    ),
    "Event": _obj(
        ("eventId", "timestamp", "mode", "deferActivation", "modelId", "joined", "observations"),
        eventId=STR,
        timestamp=TIME,
        mode=STR,
        deferActivation={"type": "boolean"},
        modelId=STR,
        episodeId=STR,
        ranking={"type": "array", "items": RANKED},
        rewardActionId=STR,
        baselineActionId=STR,
        slots={
            "type": "array",
            "items": _obj(
                ("id", "rewardActionId", "baselineActionId", "ranking"),
                id=STR,
                rewardActionId=STR,
                baselineActionId=STR,
                ranking={"type": "array", "items": RANKED},
            ),
        },
        joined={"type": "boolean"},
        observations={
            "type": "array",
            "items": _obj(
                ("kind", "value", "receivedTime", "status"),
                kind=STR,
                value={"type": ["number", "null"]},
                receivedTime=TIME,
                status=STR,
                slotId=STR,
            ),
        },
        reward=NUM,
        rewarded={"type": "boolean"},
        learnable={"type": "boolean"},
        inferenceExplanation=EXPLANATION,
    ),
    "ServiceConfiguration": _service_configuration(),
    "PolicyContract": PolicyContract.model_json_schema(by_alias=True),
    "PolicyReferenceContract": _obj(("evaluationId", "policyName"), evaluationId=ID, policyName=ID),
    "EvaluationContract": _obj(
        ("name", "startTime", "endTime"),
        **WINDOW,
        policies={"type": "array", "maxItems": 10, "items": _ref("PolicyContract")},
        enablePolicyOptimization={"type": "boolean"},
    ),
    "Evaluation": _obj(
        (*JOB_REQUIRED, "evaluationType"),
        **JOB,
        evaluationType={"enum": ["Manual", "Auto"]},
        optimalPolicy=STR,
        content=_obj(
            value={"type": "array", "items": _obj(("name", "policySource"), name=STR)},
            intervalInMinutes={"type": "integer"},
        ),
    ),
    "EvaluationList": _list_of(_obj((*JOB_REQUIRED, "evaluationType"), **JOB)),
    "FeatureImportanceContract": _obj(("name", "startTime", "endTime"), **WINDOW),
    "FeatureImportance": _obj(
        JOB_REQUIRED,
        **JOB,
        featureScores={
            "type": "array",
            "items": _obj(
                ("namespace", "featureName", "score"), namespace=STR, featureName=STR, score=NUM
            ),
        },
    ),
    "FeatureImportanceList": _list_of(_obj(JOB_REQUIRED, **JOB)),
    # `{}` when the loop has no logged events (as Personalizer answered).
    "LogsProperties": _obj(dateRange=_obj(("from", "to"), to=TIME, **{"from": TIME})),
    "ModelProperties": _obj(
        ("creationTime", "lastModifiedTime"), creationTime=TIME, lastModifiedTime=TIME
    ),
    "Model": {"type": "string", "format": "binary"},
    "LoopContract": _obj(kind={"enum": ["cb", "ccb", "rl"], "default": "cb"}),
    "Loop": LOOP,
    "LoopList": _list_of(LOOP),
    "KeyContract": _obj(
        label={"type": ["string", "null"], "maxLength": 256},
        expiresAt={"type": ["string", "null"], "format": "date-time"},
        expiresInDays={"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 36500},
    ),
    "AdminKey": _obj(KEY_FIELDS, **KEY),
    "NewAdminKey": _obj((*KEY_FIELDS, "key"), **KEY, key=SECRET),
    "AdminKeyList": _list_of(_ref("AdminKey")),
    "ClientKey": _obj((*KEY_FIELDS, "loop"), **KEY, loop=NULLABLE_STR),
    "NewClientKey": _obj((*KEY_FIELDS, "loop", "key"), **KEY, loop=NULLABLE_STR, key=SECRET),
    "ClientKeyList": _list_of(_ref("ClientKey")),
    "Health": _obj(("status",), status=STR),
    "Readiness": _obj(
        ("status", "checks", "logBacklogBytes"),
        status={"enum": ["ready", "degraded", "not ready"]},
        checks={"type": "object", "additionalProperties": STR},
        logBacklogBytes={"type": "integer"},
        failingLoops={
            "type": "array",
            "items": _obj(
                ("loop", "since", "failures", "error"),
                loop=STR,
                since=TIME,
                failures={"type": "integer"},
                error=STR,
            ),
        },
    ),
}

# Every request may be refused for its size (413: a declared Content-Length over the limit) or
# for sending its body too slowly (408), whatever the operation.
ANY_REQUEST: dict[int, tuple[str, ...]] = {408: ("RequestTimeout",), 413: ("PayloadSizeExceeded",)}
KEYED: dict[int, tuple[str, ...]] = {401: ("Unauthorized",), 403: ("InvalidApiAccess",)}
IN_LOOP: dict[int, tuple[str, ...]] = {404: ("ResourceNotFound",)}
# Rank, reward and activate shed load instead of queueing it.
HOT: dict[int, tuple[str, ...]] = {429: ("TooManyRequests",), 503: ("ServiceUnavailable",)}
DEFAULT_ERRORS: dict[int, tuple[str, ...]] = {
    400: ("BadRequest",),
    **KEYED,
    **IN_LOOP,
    **ANY_REQUEST,
    429: ("TooManyRequests",),
}
ERROR_TEXT = {
    400: "Invalid request",
    401: "Missing or unknown key",
    403: "The key may not do this",
    404: "Not found",
    408: "The request body arrived too slowly",
    409: "Conflict",
    413: "Request body too large",
    429: "Rate limited: retry after `Retry-After` seconds",
    503: "Overloaded or not ready: retry later",
}


@dataclass(frozen=True)
class Op:
    """How one operation (by its endpoint's name) is documented: success status -> body
    (schema name, media type, or None for no body), its own error codes by status (the ones
    every operation of its kind gives are added from `kind`), its request body, query
    parameters the code reads by hand, and extra response headers."""

    summary: str
    ok: Mapping[int, str | tuple[str, ...] | None]
    errors: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    body: str | None = None
    body_required: bool = True
    # loop: on a loop (key, loop exists); hot: also sheds load; admin: key; public: no key
    kind: str = "loop"
    query: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    headers: Mapping[int, Mapping[str, str]] = field(default_factory=dict)


BAD_JSON = ("BadRequest",)  # FastAPI's own answer to a body that is not JSON
EVAL_CONTRACT = (
    "InvalidEvaluationContract",
    "InvalidDateTimesInEvaluationContract",
    "MaximumEvaluationCustomPoliciesExceeded",
    "InvalidPolicyConfiguration",
    "DuplicateCustomPolicyNames",
    "EvaluationAlreadyExists",
    *BAD_JSON,
)

OPERATIONS: dict[str, Op] = {
    "rank": Op(
        "Rank actions for a context",
        {201: "RankResponse"},
        {400: ("InvalidRankRequest",)},
        body="RankRequest",
        kind="hot",
    ),
    "reward": Op(
        "Reward an event",
        {204: None},
        {400: ("InvalidRewardRequest",)},
        body="RewardRequest",
        kind="hot",
    ),
    "activate": Op(
        "Activate a deferred event",
        {204: None},
        {400: ("InvalidEventIdToActivate",)},
        kind="hot",
    ),
    "rank_multi_slot": Op(
        "Rank actions for several slots (loops of kind ccb)",
        {201: "MultiSlotRankResponse"},
        {400: ("InvalidRankRequest", "InvalidMultiSlotApiAccess")},
        body="MultiSlotRankRequest",
        kind="hot",
    ),
    "reward_multi_slot": Op(
        "Reward slots of a multi-slot event",
        {204: None},
        {400: ("InvalidRewardRequest", "InvalidMultiSlotApiAccess")},
        body="MultiSlotRewardRequest",
        kind="hot",
    ),
    "activate_multi_slot": Op(
        "Activate a deferred multi-slot event",
        {204: None},
        {400: ("InvalidEventIdToActivate", "InvalidMultiSlotApiAccess")},
        kind="hot",
    ),
    "get_event": Op(
        "dloop: a logged event, its observations and joined reward",
        {200: "Event"},
        {404: ("EventNotFound",)},
    ),
    "end_episode": Op(
        "dloop: end an RL episode (loops of kind rl)",
        {204: None},
        {400: ("InvalidRequest",)},
        body="EpisodeEnd",
        body_required=False,
    ),
    "get_service_configuration": Op("Get the service configuration", {200: "ServiceConfiguration"}),
    "update_service_configuration": Op(
        "Update the service configuration",
        {200: "ServiceConfiguration"},
        {
            400: (
                "InvalidServiceConfiguration",
                "InvalidLearningModeServiceConfiguration",
                *BAD_JSON,
            ),
            403: ("ProblemTypeIncompatibleWithAutoOptimization",),
        },
        body="ServiceConfiguration",
    ),
    "get_policy": Op("Get the learning policy", {200: "PolicyContract"}),
    "update_policy": Op(
        "Update the learning policy (retrains the model)",
        {200: "PolicyContract"},
        {400: ("InvalidPolicyContract", "InvalidPolicyConfiguration", *BAD_JSON)},
        body="PolicyContract",
    ),
    "reset_policy": Op("Reset the learning policy to the default", {200: "PolicyContract"}),
    "apply_from_evaluation": Op(
        "Make an evaluated policy the loop's policy",
        {204: None},
        {
            400: ("InvalidRequest", *BAD_JSON),
            404: ("EvaluationNotFound", "LearningSettingsNotFound"),
        },
        body="PolicyReferenceContract",
    ),
    "create_evaluation": Op(
        "Create an offline evaluation",
        {200: "Evaluation"},
        {400: ("InvalidRequest", *EVAL_CONTRACT)},
        body="EvaluationContract",
    ),
    "create_evaluation_v1": Op(
        "v1.0: create an offline evaluation with a generated id",
        {201: "Evaluation"},
        {400: EVAL_CONTRACT},
        body="EvaluationContract",
        headers={201: {"Location": "the new evaluation, relative to this path"}},
    ),
    "get_evaluation": Op(
        "Get an offline evaluation",
        {200: "Evaluation"},
        {400: ("InvalidRequest", "IncompatibleIntervalAndWindow"), 404: ("EvaluationNotFound",)},
        query={
            "intervalInMinutes": {"type": "integer", "enum": [5, 60, 360, 720, 1440]},
            "window": {"enum": ["Expanding", "Rolling"]},
        },
    ),
    "list_evaluations": Op("List offline evaluations", {200: "EvaluationList"}),
    "delete_evaluation": Op(
        "Delete an offline evaluation", {204: None}, {404: ("EvaluationNotFound",)}
    ),
    "create_feature_importance": Op(
        "Create a feature importance job",
        {200: "FeatureImportance"},
        {400: ("InvalidRequest", "FeatureImportanceAlreadyExists", *BAD_JSON)},
        body="FeatureImportanceContract",
    ),
    "get_feature_importance": Op(
        "Get a feature importance job",
        {200: "FeatureImportance"},
        {404: ("FeatureImportanceNotFound",)},
    ),
    "list_feature_importances": Op("List feature importance jobs", {200: "FeatureImportanceList"}),
    "delete_feature_importance": Op(
        "Delete a feature importance job", {204: None}, {404: ("FeatureImportanceNotFound",)}
    ),
    "export_model": Op(
        "Export the model (a signed zip with signed=true)",
        {200: ("application/octet-stream", "application/zip")},
        {400: BAD_JSON},
    ),
    "import_model": Op(
        "Import a model (raw VW model or signed zip)",
        {204: None},
        {400: ("InvalidModelImportFormat", "InvalidModelImportSignature")},
        body="Model",
    ),
    "reset_model": Op("Reset the model to a blank one", {204: None}),
    "get_model_properties": Op("Get the model's properties", {200: "ModelProperties"}),
    "delete_logs": Op("Delete the loop's logged events", {204: None}),
    "get_log_properties": Op(
        "Get the logged events' date range (`{}` when there are none)", {200: "LogsProperties"}
    ),
    "list_loops": Op("List loops", {200: "LoopList"}, kind="admin"),
    "create_loop": Op(
        "Create a loop (200 if it exists with that kind)",
        {200: "Loop", 201: "Loop"},
        {400: ("InvalidRequest", *BAD_JSON), 409: ("Conflict",)},
        body="LoopContract",
        kind="admin",
    ),
    "delete_loop": Op(
        "Delete a loop and its data",
        {204: None},
        {400: ("InvalidRequest",), 404: ("ResourceNotFound",)},
        kind="admin",
    ),
    "list_admin_keys": Op("List the admin keys", {200: "AdminKeyList"}, kind="admin"),
    "create_admin_key": Op(
        "Create an admin key (shown once)",
        {201: "NewAdminKey"},
        {400: ("InvalidRequest", *BAD_JSON)},
        body="KeyContract",
        kind="admin",
    ),
    "revoke_admin_key": Op(
        "Revoke an admin key (not the last valid one)",
        {204: None},
        {400: BAD_JSON, 404: ("ResourceNotFound",), 409: ("Conflict",)},
        kind="admin",
    ),
    "create_client_key": Op(
        "Create a client key (rank, reward, activate on this loop; shown once)",
        {201: "NewClientKey"},
        {400: ("InvalidRequest", *BAD_JSON), 404: ("ResourceNotFound",)},
        body="KeyContract",
        kind="admin",
    ),
    "list_client_keys": Op(
        "List the loop's keys", {200: "ClientKeyList"}, {404: ("ResourceNotFound",)}, kind="admin"
    ),
    "delete_client_key": Op(
        "Delete a client key",
        {204: None},
        {400: BAD_JSON, 404: ("ResourceNotFound",), 409: ("Conflict",)},
        kind="admin",
    ),
    "healthz": Op("Liveness (no key)", {200: "Health"}, kind="public"),
    "readyz": Op(
        "Readiness (no key): storage, log and models",
        {200: "Readiness", 503: "Readiness"},
        kind="public",
    ),
    "metrics": Op("Prometheus metrics", {200: ("text/plain",)}, kind="admin"),
}


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
    responses.pop("422", None)  # validation errors are 400 here (service.errors)
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
        return {"application/octet-stream": {"schema": _ref(what)}}
    return {JSON: {"schema": _ref(what)}}


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
