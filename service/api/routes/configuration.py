"""Service configuration and learning policy (Personalizer's /configurations)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body
from pydantic import ValidationError

from learners.policy import PolicyError, algorithm
from learners.sandbox import check_policy
from service.api.deps import AdminLoop, State, ViewLoop
from service.api.errors import ApiError, bad_request
from service.api.state import Dloop
from service.core.schemas import (
    DLOOP_FIELDS,
    PolicyContract,
    ServiceConfiguration,
    default_policy,
    parse_config,
    validation_message,
)
from service.pipeline.runtime import LoopRuntime
from service.storage import store

router = APIRouter()
Payload = Annotated[Any, Body()]


def _with_metrics(d: Dloop, rt: LoopRuntime) -> dict[str, Any]:
    doc = dict(rt.config)
    with d.sessions() as session:
        metrics = store.apprentice_metrics(session, loop=rt.name)
    if metrics is not None:
        doc["latestApprenticeModeMetrics"] = metrics
    return doc


@router.get("/personalizer/configurations/service")
def get_service_configuration(d: State, rt: ViewLoop) -> dict[str, Any]:
    return _with_metrics(d, rt)


@router.put("/personalizer/configurations/service")
def update_service_configuration(
    d: State, rt: AdminLoop, payload: Payload = None
) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise bad_request("InvalidServiceConfiguration", "body must be a ServiceConfiguration")
    payload = {**{k: rt.config[k] for k in DLOOP_FIELDS if k in rt.config}, **payload}
    try:
        new = parse_config(payload)
    except ValueError as exc:
        raise bad_request("InvalidServiceConfiguration", str(exc)) from None
    if (new.exposure_caps or new.max_exploration_probability is not None) and rt.kind != "cb":
        raise bad_request(
            "InvalidServiceConfiguration",
            "exposureCaps and maxExplorationProbability apply to single-slot loops (kind cb)",
        )
    if rt.loop_kind.multi_slot and new.is_auto_optimization_enabled:
        raise ApiError(
            403,
            "ProblemTypeIncompatibleWithAutoOptimization",
            "auto-optimization is not available for multi-slot loops",
        )
    # The stored configuration as it loads, not checked again: one stored before a limit of
    # parse_config existed must not stop the update that replaces it.
    old = ServiceConfiguration.model_validate(rt.config)
    if new.learning_mode != old.learning_mode and (
        new.default_reward != old.default_reward
        or new.reward_wait_time != old.reward_wait_time
        or new.reward_aggregation != old.reward_aggregation
    ):
        raise bad_request(
            "InvalidLearningModeServiceConfiguration",
            "change learningMode in its own update, without changing defaultReward, "
            "rewardWaitTime or rewardAggregation",
        )
    new.last_configuration_edit_date = datetime.fromtimestamp(d.clock(), UTC)
    # The reward definition's version counts its changes (the client's value is ignored).
    new.reward_definition_version = old.reward_definition_version
    if new.reward_definition != old.reward_definition:
        new.reward_definition_version += 1
    d.control.save(rt, config=new.stored(), policy=rt.policy)
    return _with_metrics(d, rt)


@router.get("/personalizer/configurations/policy")
def get_policy(rt: ViewLoop) -> dict[str, str]:
    return rt.policy


@router.put("/personalizer/configurations/policy")
def update_policy(d: State, rt: AdminLoop, payload: Payload = None) -> dict[str, str]:
    try:
        policy = PolicyContract.model_validate(payload)
    except ValidationError as exc:
        raise bad_request("InvalidPolicyContract", validation_message(exc)) from None
    try:
        check_policy(policy.arguments, algorithm=algorithm(rt.kind))
    except PolicyError as exc:
        raise bad_request("InvalidPolicyConfiguration", str(exc)) from None
    doc = policy.model_dump(by_alias=True)
    d.control.save(rt, config=rt.config, policy=doc)
    return doc


@router.delete("/personalizer/configurations/policy")
def reset_policy(d: State, rt: AdminLoop) -> dict[str, str]:
    d.control.save(rt, config=rt.config, policy=default_policy(rt.kind, d.settings.default_policy))
    return rt.policy
