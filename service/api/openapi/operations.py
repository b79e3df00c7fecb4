"""What the OpenAPI document says of each operation: its request body, success responses and the
4xx answers it can give, with their error codes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
    "outcomes": Op(
        "dloop: named outcomes of an event (click, purchase, ...)",
        {204: None},
        {400: ("InvalidOutcomeRequest",)},
        body="OutcomesRequest",
        kind="hot",
    ),
    "outcomes_multi_slot": Op(
        "dloop: named outcomes of slots of a multi-slot event",
        {204: None},
        {400: ("InvalidOutcomeRequest", "InvalidMultiSlotApiAccess")},
        body="MultiSlotOutcomesRequest",
        kind="hot",
    ),
    "local_settings": Op(
        "dloop: a loop's serving settings, for an in-process ranker (service.local)",
        {200: "LocalSettings"},
        {404: ("ResourceNotFound",)},
    ),
    "local_model": Op(
        "dloop: the served model's bytes (ETag: its id; If-None-Match and ?wait=: long poll)",
        {200: ("application/octet-stream",), 204: None, 304: None},
        {400: ("InvalidRequest",), 404: ("ResourceNotFound",)},
        query={"wait": {"type": "number", "minimum": 0, "maximum": 30}},
        headers={
            200: {
                "X-Dloop-Model-Id": "the model's id",
                "ETag": "the model's id, quoted",
                "X-Dloop-Model-Sha256": "the model's SHA-256 (hex): load no bytes that miss it",
            }
        },
    ),
    "local_records": Op(
        "dloop: decision-log records an in-process ranker made (one JSON object a line)",
        {202: "RecordsAccepted"},
        {400: ("InvalidRecords",), 404: ("ResourceNotFound",), 503: ("ServiceUnavailable",)},
        body="Records",
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
    "get_overview": Op(
        "dloop: every loop at a glance (the dashboard's overview), a page at a time",
        {200: "Overview"},
        {400: ("InvalidRequest",)},
        kind="admin",
        query={
            "skip": {"type": "integer", "minimum": 0, "default": 0},
            "top": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
        },
    ),
    "get_holdout": Op(
        "dloop: the live holdout's uplift (online against holdout decisions)",
        {200: "Holdout"},
        {404: ("ResourceNotFound",)},
        kind="admin",
    ),
    "get_guardrails": Op(
        "dloop: a loop's guardrails, each one's state and figures, and whether it falls back",
        {200: "Guardrails"},
        {404: ("ResourceNotFound",)},
        kind="admin",
    ),
    "get_stats": Op(
        "dloop: a loop's statistics per time bucket, from the joiner's rollups",
        {200: "LoopStats"},
        {400: ("InvalidRequest",), 404: ("ResourceNotFound",)},
        kind="admin",
    ),
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
