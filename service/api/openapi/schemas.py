"""The OpenAPI document's shared parts: its description and the component schemas (request and
response bodies, Personalizer's documents)."""

from __future__ import annotations

from typing import Any

from learners.outcomes import AGGREGATIONS
from learners.reward import NAME
from service.core.kinds import CB, KINDS
from service.core.schemas import OutcomeSpec, PolicyContract, ServiceConfiguration

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


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: tuple[str, ...] = (), **properties: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        doc["required"] = list(required)
    return doc


def _list_of(item: dict[str, Any]) -> dict[str, Any]:
    return _obj(("value",), value={"type": "array", "items": item})


def _service_configuration() -> dict[str, Any]:
    doc = ServiceConfiguration.model_json_schema(
        by_alias=True, ref_template="#/components/schemas/{model}"
    )
    doc.pop("$defs", None)  # OutcomeSpec, a component of its own (OUTCOME_SPEC)
    # A validator, not the type, limits it (case-insensitively; answered in lower case).
    doc["properties"]["rewardAggregation"]["enum"] = list(AGGREGATIONS)
    doc["properties"]["rewardDefinitionVersion"]["readOnly"] = True
    return doc


def _outcome_spec() -> dict[str, Any]:
    doc = OutcomeSpec.model_json_schema(by_alias=True)
    doc["properties"]["name"]["pattern"] = NAME.pattern
    doc["properties"]["aggregation"]["enum"] = list(AGGREGATIONS)
    return doc


STR = {"type": "string"}
ID = {"type": "string", "minLength": 1, "maxLength": 256}
NUM = {"type": "number"}
TIME = {"type": "string", "format": "date-time"}
REWARD = {"type": "number", "minimum": -1, "maximum": 1}
OUTCOMES = {
    "type": "object",
    "description": "dloop: named outcomes (configured in the service configuration's outcomes, "
    "each within its range; `reward` is Personalizer's reward)",
    "minProperties": 1,
    "maxProperties": 32,
    "additionalProperties": {"type": "number"},
}
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
LOOP = _obj(("name", "kind", "createdTime"), name=STR, kind={"enum": list(KINDS)}, createdTime=TIME)
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
UNIT_ID = {
    **ID,
    "description": "dloop: the live holdout's key (a user, a session): the same unitId is always "
    "on the same side; without it the episodeId (rl) or the eventId decides",
}
HOLDOUT_MARK = {
    "type": "boolean",
    "description": "dloop: present (true) when the decision was held out (served by the "
    "loop's holdout policy)",
}
NULLABLE_NUM = {"type": ["number", "null"]}
PAIR = {"type": "array", "items": NUM, "minItems": 2, "maxItems": 2}
NULLABLE_PAIR = {"type": ["array", "null"], "items": NUM, "minItems": 2, "maxItems": 2}
SIDE = _obj(("decisions", "meanReward"), decisions={"type": "integer"}, meanReward=NULLABLE_NUM)
ESTIMATE = {
    "type": ["object", "null"],
    "properties": {
        "estimate": NUM,
        "interval95": NULLABLE_PAIR,
        "effectiveSampleSize": NUM,
    },
}
_BUCKET_FIGURES = {
    "joined": {"type": "integer"},
    "rewarded": {"type": "integer"},
    "defaulted": {"type": "integer"},
    "meanReward": _obj(all=NULLABLE_NUM, online=NULLABLE_NUM, holdout=NULLABLE_NUM),
    "onlineInterval95": NULLABLE_PAIR,
    "holdoutInterval95": NULLABLE_PAIR,
    "counterfactual": _obj(baseline=ESTIMATE, random=ESTIMATE),
    "explorationShare": NULLABLE_NUM,
    "actionShares": {"type": "object", "additionalProperties": NUM},
}
STATS_BUCKET = _obj(
    ("start", "decisions", "late", "dangling"),
    start=TIME,
    decisions={"type": "integer", "description": "decisions made (ranked) in the bucket"},
    late={"type": "integer"},
    dangling={"type": "integer"},
    episodes=_obj(count={"type": "integer"}, meanReturn=NUM),
    slots={"type": "array", "items": _obj(("id",), id=STR, **_BUCKET_FIGURES)},
    outcomes={
        "type": "object",
        "description": "named outcomes: each one's mean over the bucket's joined decisions "
        "(its default where it never arrived)",
        "additionalProperties": _obj(
            ("decisions", "mean"), decisions={"type": "integer"}, mean=NUM
        ),
    },
    **_BUCKET_FIGURES,
)

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
        unitId=UNIT_ID,
    ),
    "RankResponse": _obj(
        ("ranking", "eventId", "rewardActionId"),
        ranking={"type": "array", "items": RANKED},
        eventId=STR,
        rewardActionId=STR,
        inferenceExplanation=EXPLANATION,
        holdout=HOLDOUT_MARK,
    ),
    "RewardRequest": _obj(("value",), value=REWARD),
    "OutcomesRequest": _obj(("outcomes",), outcomes=OUTCOMES),
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
        unitId=UNIT_ID,
    ),
    "MultiSlotRankResponse": _obj(
        ("eventId", "slots"),
        eventId=STR,
        slots={
            "type": "array",
            "items": _obj(("id", "rewardActionId"), id=STR, rewardActionId=STR, probability=NUM),
        },
        holdout=HOLDOUT_MARK,
    ),
    "MultiSlotRewardRequest": _obj(
        ("reward",),
        reward={
            "type": "array",
            "minItems": 1,
            "items": _obj(("slotId", "value"), slotId=ID, value=REWARD),
        },
    ),
    "MultiSlotOutcomesRequest": _obj(
        ("outcomes",),
        outcomes={
            "type": "array",
            "minItems": 1,
            "items": _obj(("slotId", "outcomes"), slotId=ID, outcomes=OUTCOMES),
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
        contextFeatures={"type": "array"},
        actions={"type": "array", "items": _obj(("id",), id=STR, features={"type": "array"})},
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
        holdout=HOLDOUT_MARK,
        observations={
            "type": "array",
            "items": _obj(
                ("kind", "value", "receivedTime", "status"),
                kind=STR,
                value={"type": ["number", "null"]},
                receivedTime=TIME,
                status=STR,
                slotId=STR,
                outcome={**STR, "description": "a named outcome's name (absent: the reward)"},
            ),
        },
        rewardDefinitionVersion={"type": "integer"},
        reward=NUM,
        rewarded={"type": "boolean"},
        learnable={"type": "boolean"},
        inferenceExplanation=EXPLANATION,
    ),
    "ServiceConfiguration": _service_configuration(),
    "OutcomeSpec": _outcome_spec(),
    "PolicyContract": PolicyContract.model_json_schema(by_alias=True),
    "PolicyReferenceContract": _obj(("evaluationId", "policyName"), evaluationId=ID, policyName=ID),
    "EvaluationContract": _obj(
        ("name", "startTime", "endTime"),
        **WINDOW,
        policies={"type": "array", "maxItems": 10, "items": ref("PolicyContract")},
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
    "LoopContract": _obj(kind={"enum": list(KINDS), "default": CB.name}),
    "Loop": LOOP,
    "LoopList": _list_of(LOOP),
    "KeyContract": _obj(
        label={"type": ["string", "null"], "maxLength": 256},
        role={
            "enum": ["viewer", None],
            "description": "dloop: viewer makes a read-only key (the dashboard, GET operations)",
        },
        expiresAt={"type": ["string", "null"], "format": "date-time"},
        expiresInDays={"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 36500},
    ),
    "AdminKey": _obj(KEY_FIELDS, **KEY),
    "NewAdminKey": _obj((*KEY_FIELDS, "key"), **KEY, key=SECRET),
    "AdminKeyList": _list_of(ref("AdminKey")),
    "ClientKey": _obj((*KEY_FIELDS, "loop"), **KEY, loop=NULLABLE_STR),
    "NewClientKey": _obj((*KEY_FIELDS, "loop", "key"), **KEY, loop=NULLABLE_STR, key=SECRET),
    "ClientKeyList": _list_of(ref("ClientKey")),
    "Holdout": _obj(
        ("holdoutPercentage", "holdoutPolicy", "online", "holdout", "uplift", "status"),
        holdoutPercentage=NUM,
        holdoutPolicy={"enum": ["baseline", "random"]},
        online=SIDE,
        holdout=SIDE,
        uplift={
            "type": ["object", "null"],
            "description": "online minus holdout mean reward; null until each side has enough "
            "joined decisions. interval95: Welch's, valid when looked at once; alwaysValid95: "
            "a confidence sequence, valid however often it is looked at",
            "properties": {"estimate": NUM, "interval95": PAIR, "alwaysValid95": PAIR},
            "required": ["estimate", "interval95", "alwaysValid95"],
        },
        status=STR,
    ),
    "LocalSettings": _obj(
        ("loop", "kind", "mode", "holdoutShare", "holdoutPolicy", "modelId"),
        loop=STR,
        kind={"enum": list(KINDS)},
        mode=STR,
        holdoutShare=NUM,
        holdoutPolicy=STR,
        exploration=NUM,
        exploresInVw={"type": "boolean"},
        episodic={"type": "boolean"},
        maxExplorationProbability={"type": ["number", "null"]},
        explain={"type": "boolean"},
        tileCoding={"type": ["object", "null"]},
        exposureCaps={"type": "array", "items": {"type": "object"}},
        maxActions={"type": "integer"},
        limits={"type": "object"},
        modelId=STR,
    ),
    "RecordsAccepted": _obj(
        ("accepted",),
        accepted={"type": "integer"},
        # Records refused as such, kept in the dead letters (source local-records), and why
        # (the first ten); both absent when none was.
        deadLettered={"type": "integer"},
        refusals={"type": "array", "items": STR, "maxItems": 10},
        # A loop with exposure caps: the capped actions at or over their cap, with the cap.
        exposureOver={"type": "object", "additionalProperties": {"type": "number"}},
    ),
    "Records": {
        "type": "string",
        "description": "decision-log records (service.core.record), one JSON object a line",
    },
    "Guardrails": _obj(
        ("loop", "fallback", "holdoutShare", "guardrails"),
        loop=STR,
        fallback={"type": "boolean", "description": "serving the holdout policy"},
        holdoutShare={
            **NUM,
            "description": "the share of decisions the holdout policy serves now",
        },
        guardrails={
            "type": "array",
            "items": _obj(
                ("outcome", "mustNot", "tolerance", "action", "state"),
                outcome=STR,
                mustNot={"enum": ["increase", "decrease"]},
                tolerance=NUM,
                action={"enum": ["alert", "fallback"]},
                state={"enum": ["ok", "breached"]},
                since=TIME,
                windowStart=TIME,
                status={"enum": ["breached", "safe", "unknown"]},
                comparator={"enum": ["holdout", "baseline"]},
                policyMean=NUM,
                comparatorMean=NUM,
                excess={
                    **NUM,
                    "description": "policy mean minus (1 +- tolerance) x comparator mean",
                },
                alwaysValid95={"type": "array", "items": {"type": ["number", "null"]}},
                decisions={"type": "integer"},
            ),
        },
    ),
    "Overview": _obj(
        ("count", "value"),
        count={"type": "integer"},
        value={
            "type": "array",
            "items": _obj(
                ("name", "kind", "learningMode", "policy", "modelId", "uplift"),
                name=STR,
                kind={"enum": list(KINDS)},
                learningMode=STR,
                policy=NULLABLE_STR,
                modelId=NULLABLE_STR,
                modelTime={"type": ["string", "null"], "format": "date-time"},
                modelAgeSeconds=NULLABLE_NUM,
                examples={"type": "integer"},
                decisionsPerMinute=NUM,
                rewardRate=NULLABLE_NUM,
                joinCoverage=NULLABLE_NUM,
                holdoutPercentage=NUM,
                uplift={"type": ["object", "null"]},
                backlog={"type": "integer"},
                deadLetters={"type": "integer"},
            ),
        },
    ),
    "LoopStats": _obj(
        ("loop", "kind", "since", "until", "bucketSeconds", "buckets", "models", "freshness"),
        loop=STR,
        kind={"enum": list(KINDS)},
        since=TIME,
        until=TIME,
        bucketSeconds={"type": "integer"},
        buckets={"type": "array", "items": STATS_BUCKET},
        models={
            "type": "array",
            "items": _obj(
                ("time", "modelId", "examples"),
                time=TIME,
                modelId=STR,
                examples={"type": "integer"},
                freshnessP50=NULLABLE_NUM,
                freshnessP95=NULLABLE_NUM,
            ),
        },
        freshness=_obj(("p50", "p95"), p50=NULLABLE_NUM, p95=NULLABLE_NUM),
        rewardDefinitions={
            "type": "array",
            "description": "every version of the reward definition and when it was set",
            "items": _obj(
                ("version", "definition", "time"),
                version={"type": "integer"},
                definition=STR,
                time=TIME,
            ),
        },
    ),
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
