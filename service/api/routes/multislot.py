"""Multi-slot rank, reward and activate (Personalizer's /multislot), for loops of kind `ccb`.

Slots are filled in request order, each from the actions still free for it (learners.ccb). The
response carries, beyond Personalizer's `{id, rewardActionId}` per slot, the probability each
slot's action was drawn with (clients asked for it; SDKs ignore unknown fields). Apprentice mode
serves every slot's baseline and logs the model's own choices; LoggingOnly serves and logs the
baselines.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.deps import loop_for
from service.api.requests import check_event_id, json_body, read_body
from service.api.routes.events import activate_event, log_observation, log_outcomes, ranked
from service.api.state import Dloop
from service.core import record
from service.core.requests import multi_slot_only, slot_outcomes, slot_rewards
from service.pipeline.runtime import LoopRuntime

router = APIRouter()


def _multislot_loop(request: Request) -> tuple[Dloop, LoopRuntime]:
    d, rt = loop_for(request, admin=False)
    multi_slot_only(rt.loop_kind.multi_slot, rt.name)
    return d, rt


async def rank_multi_slot(request: Request) -> Response:
    """A multi-slot rank runs whole in a ranking process (service.core.ranks.rank_slots)."""
    d, rt = _multislot_loop(request)
    return await ranked(d, rt, await read_body(request), slots=True)


async def reward_multi_slot(request: Request) -> Response:
    """`{"reward": [{"slotId", "value"}]}`; a slot's rewards may come in several calls."""
    event_id = request.path_params["event_id"]
    d, rt = _multislot_loop(request)
    check_event_id(event_id, "InvalidRewardRequest")
    body = await json_body(request, "InvalidRewardRequest")
    for slot, value in slot_rewards(body):
        log_observation(d, rt, record.REWARD, event_id, value, slot=slot)
        d.metrics.rewards.labels(rt.name).inc()
    return Response(status_code=204)


async def outcomes_multi_slot(request: Request) -> Response:
    """dloop: `{"outcomes": [{"slotId", "outcomes": {"click": 1, ...}}]}`, named outcomes per
    slot (learners.outcomes)."""
    event_id = request.path_params["event_id"]
    d, rt = _multislot_loop(request)
    check_event_id(event_id, "InvalidOutcomeRequest")
    body = await json_body(request, "InvalidOutcomeRequest")
    for slot, values in slot_outcomes(rt.settings.rules.rewards, body):
        log_outcomes(d, rt, event_id, values, slot=slot)
    return Response(status_code=204)


async def activate_multi_slot(request: Request) -> Response:
    d, rt = _multislot_loop(request)
    return await activate_event(request, d, rt)


router.add_route("/personalizer/multislot/rank", rank_multi_slot, methods=["POST"])
router.add_route(
    "/personalizer/multislot/events/{event_id}/reward", reward_multi_slot, methods=["POST"]
)
router.add_route(
    "/personalizer/multislot/events/{event_id}/activate", activate_multi_slot, methods=["POST"]
)
router.add_route(
    "/personalizer/multislot/events/{event_id}/outcomes", outcomes_multi_slot, methods=["POST"]
)
