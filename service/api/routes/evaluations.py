"""Offline evaluations (Personalizer's /evaluations), applyFromEvaluation, feature importance.

PUT creates a job (v1.0: POST /evaluations); it runs in the background
(service.pipeline.evaluations) and GET shows its status, progress (dloop: `progress` from 0 to
1) and, once Succeeded, the result: per policy (Online, Baseline, Random, Custom,
OfflineExperimentation) the doubly robust estimate of its average reward with a 95% confidence
interval, and a time series.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, TypeGuard, TypeVar

from fastapi import APIRouter, Body, Request
from starlette.responses import JSONResponse, Response

from learners.dsjson import parse_time, timestamp
from learners.policy import PolicyError, algorithm
from learners.reward import DefinitionError
from learners.sandbox import check_policy
from service.api.deps import AdminLoop, State, ViewLoop
from service.api.errors import ApiError, bad_request
from service.api.state import Dloop
from service.core.schemas import offline_rules
from service.pipeline.runtime import LoopRuntime
from service.storage import store
from service.storage.models import Evaluation, FeatureImportance, OfflineJob

router = APIRouter()
Payload = Annotated[Any, Body()]

MAX_POLICIES = 10
INTERVALS = {5, 60, 360, 720, 1440}


def _instant(value: Any, field: str, code: str) -> float:
    try:
        t = parse_time(value)
        timestamp(t)  # every job document answers it back, so it must be a representable year
    except (AttributeError, TypeError, ValueError, OverflowError):  # not a string or date-time
        raise bad_request(code, f"{field} must be an ISO-8601 date-time") from None
    return t


def _is_id(value: Any) -> TypeGuard[str]:
    """A job id or name: 1 to 256 characters, none of them NUL (Postgres text cannot hold it)."""
    return isinstance(value, str) and 0 < len(value) <= 256 and "\x00" not in value


def _window(payload: Any, *, code: str, order_code: str, body: str) -> tuple[str, float, float]:
    """The `name`, `startTime` and `endTime` every job contract has (400 `code` if wrong)."""
    if not isinstance(payload, dict):
        raise bad_request(code, f"body must be {body}")
    name = payload.get("name")
    if not _is_id(name):
        raise bad_request(code, "name must have 1 to 256 characters, none of them NUL")
    start, end = (_instant(payload.get(f), f, code) for f in ("startTime", "endTime"))
    if start > end:
        raise bad_request(order_code, "startTime is after endTime")
    return name, start, end


Job = TypeVar("Job", bound=OfflineJob)


def _new_job(d: Dloop, table: type[Job], job: Job, *, exists: str) -> Job:
    """Store a new job (400 `exists` if the id is taken), NotSubmitted; the caller submits it."""
    job.created_at = d.clock()
    job.status = "NotSubmitted"
    job.progress = 0.0
    with d.sessions.begin() as session:
        if session.get(table, (job.loop, job.id)) is not None:
            raise bad_request(exists, f"'{job.id}' exists")
        session.add(job)
    return job


def _find(d: Dloop, rt: LoopRuntime, table: type[Job], job_id: str, *, missing: str) -> Job:
    job = None
    if _is_id(job_id):  # no other id can have been stored
        with d.sessions() as session:
            job = session.get(table, (rt.name, job_id))
    if job is None:
        raise ApiError(404, missing, f"'{job_id}' not found")
    return job


def _delete(d: Dloop, job: OfflineJob) -> Response:
    with d.sessions.begin() as session:
        row = session.get(type(job), (job.loop, job.id))
        if row is not None:
            session.delete(row)
    return Response(status_code=204)


def _job_doc(job: OfflineJob, *, summary: bool, **extra: Any) -> dict[str, Any]:
    """The fields every job document has; the list view (`summary`) stops at the status."""
    doc: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "startTime": timestamp(job.start_time),
        "endTime": timestamp(job.end_time),
        "creationTime": timestamp(job.created_at),
        "status": job.status,
        **extra,
    }
    if not summary:
        doc["progress"] = job.progress
        if job.description:
            doc["description"] = job.description
    return doc


def _doc(ev: Evaluation, *, summary: bool = False, series: str = "5/Expanding") -> dict[str, Any]:
    doc = _job_doc(ev, summary=summary, evaluationType=ev.evaluation_type)
    if summary:
        return doc
    if ev.optimal_policy:
        doc["optimalPolicy"] = ev.optimal_policy
    if ev.reward_definition is not None:
        doc["rewardDefinition"] = ev.reward_definition
    if ev.content is not None:
        content = dict(ev.content)
        content["intervalInMinutes"] = int(series.split("/")[0])
        values = []
        for v in content.get("value", []):
            v = dict(v)
            every = v.pop("dloopTimeseries", None)
            if every is not None:
                v["timeseries"] = {"data": every.get(series, [])}
            values.append(v)
        content["value"] = values
        doc["content"] = content
    return doc


def _definition(rt: LoopRuntime, formula: Any, policy: str | None) -> str:
    """A reward definition asked for in an evaluation (of the evaluation or of one policy),
    checked against the loop's outcomes, or a 400 saying where it fails."""
    where = f"{policy}: rewardDefinition" if policy else "rewardDefinition"
    if rt.loop_kind.episodic:
        raise bad_request("InvalidEvaluationContract", "RL loops evaluate their own reward")
    if not isinstance(formula, str):
        raise bad_request("InvalidEvaluationContract", f"{where} must be a string")
    try:
        offline_rules(rt.config, formula)
    except DefinitionError as exc:
        raise bad_request("InvalidEvaluationContract", f"{where}: {exc}") from None
    return formula


def _create(d: Dloop, rt: LoopRuntime, evaluation_id: str, payload: Any) -> Evaluation:
    if not _is_id(evaluation_id):
        raise bad_request("InvalidRequest", "evaluation ids have 1 to 256 characters, not NUL")
    name, start, end = _window(
        payload,
        code="InvalidEvaluationContract",
        order_code="InvalidDateTimesInEvaluationContract",
        body="an EvaluationContract",
    )
    policies = payload.get("policies") or []
    if not isinstance(policies, list):
        raise bad_request("InvalidEvaluationContract", "policies must be a list")
    if len(policies) > MAX_POLICIES:
        raise bad_request(
            "MaximumEvaluationCustomPoliciesExceeded", f"at most {MAX_POLICIES} custom policies"
        )
    custom = []
    for p in policies:
        if not isinstance(p, dict) or not _is_id(p.get("name")):
            raise bad_request("InvalidEvaluationContract", "each policy needs a name (an id)")
        if not isinstance(p.get("arguments"), str):
            raise bad_request("InvalidEvaluationContract", "each policy needs arguments")
        try:
            check_policy(p["arguments"], algorithm=algorithm(rt.kind))
        except PolicyError as exc:
            raise bad_request("InvalidPolicyConfiguration", f"{p['name']}: {exc}") from None
        item = {"name": p["name"], "arguments": p["arguments"]}
        if p.get("rewardDefinition") is not None:  # dloop: trained for another objective
            item["rewardDefinition"] = _definition(rt, p["rewardDefinition"], p["name"])
        custom.append(item)
    if rt.loop_kind.episodic and (custom or payload.get("enablePolicyOptimization")):
        raise bad_request(
            "InvalidEvaluationContract",
            "RL loops evaluate the online policy, its current model, baseline and random",
        )
    if len({p["name"] for p in custom}) != len(custom):
        raise bad_request("DuplicateCustomPolicyNames", "custom policy names must be unique")
    optimize = payload.get(
        "enablePolicyOptimization", payload.get("enableOfflineExperimentation", False)
    )
    if not isinstance(optimize, bool):
        raise bad_request("InvalidEvaluationContract", "enablePolicyOptimization is a boolean")
    reward = payload.get("rewardDefinition")
    if reward is not None:
        reward = _definition(rt, reward, None)
    ev = _new_job(
        d,
        Evaluation,
        Evaluation(
            loop=rt.name,
            id=evaluation_id,
            name=name,
            start_time=start,
            end_time=end,
            evaluation_type="Manual",
            policies=custom,
            optimize=optimize,
            reward_definition=reward,
        ),
        exists="EvaluationAlreadyExists",
    )
    d.jobs.submit(rt.name, evaluation_id)
    return ev


@router.put("/personalizer/evaluations/{evaluation_id}")
def create_evaluation(d: State, rt: AdminLoop, evaluation_id: str, payload: Payload = None) -> Any:
    return _doc(_create(d, rt, evaluation_id, payload))


@router.post("/personalizer/evaluations")
def create_evaluation_v1(d: State, rt: AdminLoop, payload: Payload = None) -> Response:
    """v1.0: POST with a generated id, 201 and the evaluation (with Location)."""
    ev = _create(d, rt, uuid.uuid4().hex, payload)
    return JSONResponse(_doc(ev), status_code=201, headers={"Location": f"evaluations/{ev.id}"})


def _get(d: Dloop, rt: LoopRuntime, evaluation_id: str) -> Evaluation:
    return _find(d, rt, Evaluation, evaluation_id, missing="EvaluationNotFound")


@router.get("/personalizer/evaluations/{evaluation_id}")
def get_evaluation(request: Request, d: State, rt: ViewLoop, evaluation_id: str) -> dict[str, Any]:
    q = request.query_params  # read here, after the key: no answer about the query without it
    interval = q.get("intervalInMinutes")
    window = q.get("window")
    if interval is not None and (
        not (interval.isascii() and interval.isdigit()) or int(interval) not in INTERVALS
    ):
        raise bad_request("InvalidRequest", f"intervalInMinutes must be one of {sorted(INTERVALS)}")
    if window is not None and window not in ("Expanding", "Rolling"):
        raise bad_request("InvalidRequest", "window must be Expanding or Rolling")
    if (window == "Expanding" and interval not in (None, "5")) or (
        window == "Rolling" and interval in (None, "5")
    ):
        raise bad_request(
            "IncompatibleIntervalAndWindow", "Expanding goes with 5 minutes, Rolling with longer"
        )
    ev = _get(d, rt, evaluation_id)
    minutes = int(interval) if interval is not None else 5
    return _doc(ev, series=f"{minutes}/{'Expanding' if minutes == 5 else 'Rolling'}")


@router.get("/personalizer/evaluations")
def list_evaluations(request: Request, d: State, rt: ViewLoop) -> Any:
    with d.sessions() as session:
        rows = store.list_evaluations(session, loop=rt.name)
    docs = [_doc(ev, summary=True) for ev in rows]
    if request.scope.get("dloop.version") == "v1.0":
        return docs  # v1.0 answered a bare array
    return {"value": docs}


@router.delete("/personalizer/evaluations/{evaluation_id}", status_code=204)
def delete_evaluation(d: State, rt: AdminLoop, evaluation_id: str) -> Response:
    return _delete(d, _get(d, rt, evaluation_id))


@router.post("/personalizer/configurations/applyFromEvaluation", status_code=204)
def apply_from_evaluation(d: State, rt: AdminLoop, payload: Payload = None) -> Response:
    """Make an evaluated policy the loop's policy (the model retrains on the loop's history)."""
    if not isinstance(payload, dict) or not all(
        isinstance(payload.get(k), str) for k in ("evaluationId", "policyName")
    ):
        raise bad_request("InvalidRequest", "body must be {evaluationId, policyName}")
    ev = _get(d, rt, payload["evaluationId"])
    results = (ev.content or {}).get("value", [])
    match = next((r for r in results if r["name"] == payload["policyName"]), None)
    if match is None or match["policySource"] in ("Baseline", "Random"):
        raise ApiError(
            404, "LearningSettingsNotFound", f"no policy '{payload['policyName']}' to apply"
        )
    d.control.save_policy(rt, {"name": match["name"], "arguments": match["arguments"]})
    return Response(status_code=204)


# ---- feature importance ----------------------------------------------------------------------


def _importance_doc(job: FeatureImportance, *, summary: bool = False) -> dict[str, Any]:
    doc = _job_doc(job, summary=summary)
    if not summary and job.scores is not None:
        doc["featureScores"] = job.scores
    return doc


@router.put("/personalizer/featureImportances/{job_id}")
def create_feature_importance(d: State, rt: AdminLoop, job_id: str, payload: Payload = None) -> Any:
    if not _is_id(job_id):
        raise bad_request("InvalidRequest", "feature importance ids have 1 to 256 characters")
    name, start, end = _window(
        payload,
        code="InvalidRequest",
        order_code="InvalidRequest",
        body="{name, startTime, endTime}",
    )
    job = _new_job(
        d,
        FeatureImportance,
        FeatureImportance(loop=rt.name, id=job_id, name=name, start_time=start, end_time=end),
        exists="FeatureImportanceAlreadyExists",
    )
    d.jobs.submit_importance(rt.name, job_id)
    return _importance_doc(job)


def _importance(d: Dloop, rt: LoopRuntime, job_id: str) -> FeatureImportance:
    return _find(d, rt, FeatureImportance, job_id, missing="FeatureImportanceNotFound")


@router.get("/personalizer/featureImportances/{job_id}")
def get_feature_importance(d: State, rt: ViewLoop, job_id: str) -> dict[str, Any]:
    return _importance_doc(_importance(d, rt, job_id))


@router.get("/personalizer/featureImportances")
def list_feature_importances(d: State, rt: ViewLoop) -> dict[str, Any]:
    with d.sessions() as session:
        rows = store.list_feature_importances(session, loop=rt.name)
    return {"value": [_importance_doc(job, summary=True) for job in rows]}


@router.delete("/personalizer/featureImportances/{job_id}", status_code=204)
def delete_feature_importance(d: State, rt: AdminLoop, job_id: str) -> Response:
    return _delete(d, _importance(d, rt, job_id))
