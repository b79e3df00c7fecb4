"""A whole rank (`rank`; `rank_slots` for a multi-slot page), from the request to its answer and
log records, done where the model is: in one of the server's ranking processes (`rank_op`, the
operation the server adds to its learners.sandbox children, so the request's checks, features
and draw run beside VW and off the serving process), or in the application's own process
(service.local.LocalRanker). One implementation, so a local decision is the server's decision
for the same model and request, and both refuse the same input with the same code and message.

The serving process keeps what must be shared across requests: the key, the retry cache (it
compares the digests a rank returns), the exposure caps' counts (it sends the caps already hit,
ExposureCaps.over, and counts the action served) and the log (it appends the records).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from learners.ccb import ccb_context
from learners.features import FeatureLimits, actions_json, with_json_string
from learners.sandbox import NO_MODEL, ModelRef
from service.core import ranking, record
from service.core.errors import ApiError, bad_request
from service.core.requests import (
    ID_RULE,
    Asked,
    asked,
    check_feature_count,
    is_id,
    load_json,
    parse_rank,
    parse_slots,
    rank_error,
)

if TYPE_CHECKING:
    from learners.sandbox.host import Host

# The model's scores for the example of a context and actions (their JSON: the context's features
# and learners.features.actions_json; parsing it only without a model), and per action the
# context features that moved its probability most.
Predict = Callable[[ModelRef, bytes, bytes], list[float]]
Explain = Callable[[ModelRef, dict[str, Any]], list[dict[str, Any]]]
# A multi-slot page filled by the model (learners.ccb.CCBRanker.rank): the context's JSON, each
# slot's allowed actions and the draw's seed in; per slot the chosen action, its order of
# actions and their probabilities out.
Fill = Callable[[ModelRef, bytes, list[list[int]], str], ranking.Decided]


def unreadable(exc: Exception) -> ApiError:
    """VW could not read the request: the 400 and message both rankers answer."""
    return rank_error(f"features could not be parsed: {str(exc)[:4000]}")


# Built on every rank: not frozen (a frozen dataclass's __init__ costs about three times a
# plain one's, record.Decision's comment says).
@dataclass(slots=True)
class Ranked:
    """A rank's decision, its response (`document`) and its log records (`records`). The
    context's JSON, as the JSON string the record holds, is written only by `records`: an
    in-process ranker calls it on its shipping thread, after the rank answered
    (service.local.LocalRanker._write)."""

    made: record.Decision  # its `c` left empty: `records` writes it from features and multi
    ids: list[str]
    pmf: list[float]
    ends_episode: bool  # an RL loop's rank without episodeId is an episode of one step
    features: bytes  # the context's features' JSON
    multi: bytes  # the actions' JSON (learners.features.actions_json)

    @property
    def event_id(self) -> str:
        return self.made.id

    @property
    def chosen(self) -> str:
        return self.ids[self.made.a[0]]

    def document(self) -> dict[str, Any]:
        """The response's body."""
        return ranking.rank_document(self.made, self.ids, self.pmf)

    def records(self) -> list[bytes]:
        """What the log gets: the decision (and the end of its one-step episode)."""
        d = self.made
        out = [record.encode(d, c_literal=with_json_string(self.features, self.multi))]
        if self.ends_episode:
            out.append(record.encode(record.EpisodeEnd(d.loop, d.id, d.t, term=True)))
        return out


def rank(
    s: ranking.Serving,
    body: Any,
    *,
    max_actions: int,
    limits: FeatureLimits,
    served: ModelRef,
    predict: Predict,
    explain: Explain,
    over: Mapping[str, float] | None,
    now: float,
) -> Ranked:
    """Rank `body` (a parsed request) for the loop `s` with the model `served`; ApiError for
    what is refused. `over`: the actions at or over their exposure cap (ExposureCaps.over)."""
    if s.kind == "ccb":
        raise rank_error("this is a multi-slot loop: rank with /multislot/rank")
    req = parse_rank(body, max_actions, limits)
    ranking.code_tiles(s.tiles, req)
    episode = body.get("episodeId")
    if episode is not None:
        if not s.episodic:
            raise rank_error("episodeId is only accepted by loops of kind rl")
        if not is_id(episode):
            raise rank_error(f"episodeId must be {ID_RULE}")
    ids: list[str] = req["ids"]
    # The actions' JSON as the checks remembered it, else encoded now.
    multi: bytes = req["multi"] or actions_json(list(zip(ids, req["features"], strict=True)))
    features = orjson.dumps(req["context"])
    held = ranking.held_out(s, req, episode)
    if s.mode == "LoggingOnly":
        predict(NO_MODEL, features, multi)  # only parses: what VW cannot read is never logged
        order, pmf = ranking.logging_only(req["eligible"])
    else:
        has_model = served.path is not None
        scores = predict(served, features, ranking.scored_actions(req, multi, has_model=has_model))
        pmf = ranking.policy_pmf(s, req, scores, has_model=has_model)
        order, pmf = ranking.decide(s, req, pmf, held=held, over=over)
    explanation = None
    if s.explain and s.mode != "LoggingOnly":
        explanation = explain(served, req)
    event_id: str = req["event_id"]
    decision = record.Decision(
        loop=s.loop,
        id=event_id,
        t=now,
        deferred=req["defer"],
        mode=s.mode,
        c="",  # the record's is written by Ranked.records
        a=order,
        p=[pmf[i] for i in order],
        b=req["eligible"].index(True),
        m=served.model_id,
        # A step of an episode; a rank without episodeId is an episode of one step.
        ep=(episode or event_id) if s.episodic else None,
        x=explanation,
        h=s.holdout_share,
        ho=held,
    )
    return Ranked(
        decision,
        ids,
        pmf,
        ends_episode=s.episodic and episode is None,
        features=features,
        multi=multi,
    )


@dataclass(frozen=True, slots=True)
class RankedSlots:
    decision: record.SlotsDecision
    ids: list[str]
    decided: ranking.Decided

    @property
    def event_id(self) -> str:
        return self.decision.id

    def document(self) -> dict[str, Any]:
        return ranking.slots_document(self.decision, self.ids, self.decided)

    def records(self) -> list[bytes]:
        return [record.encode(self.decision)]


def rank_slots(
    s: ranking.Serving,
    body: Any,
    *,
    max_actions: int,
    limits: FeatureLimits,
    served: ModelRef,
    fill: Fill,
    now: float,
) -> RankedSlots:
    """A multi-slot rank (Personalizer's /multislot/rank) of `body` for the loop `s`: slots
    filled in request order, each from the actions still free for it; Apprentice mode serves
    every slot's baseline and logs the model's choices; LoggingOnly serves and logs the
    baselines; a held-out page is served by the holdout policy."""
    if s.kind != "ccb":
        raise bad_request(
            "InvalidMultiSlotApiAccess",
            f"loop '{s.loop}' is single-slot; multi-slot needs a loop of kind ccb",
        )
    req = parse_rank(body, max_actions, limits)
    if body.get("episodeId") is not None:  # (as a single-slot loop that is not rl refuses it)
        raise rank_error("episodeId is only accepted by loops of kind rl")
    ranking.code_tiles(s.tiles, req)
    ids: list[str] = req["ids"]
    slots, count = parse_slots(body, ids, limits)
    check_feature_count(req["features_count"] + count, limits)
    c = ccb_context(
        req["context"],
        list(zip(ids, req["features"], strict=True)),
        [(slot["id"], slot["features"], slot["allowed"]) for slot in slots],
    )
    text = orjson.dumps(c)
    seed = f"{s.loop}/{req['event_id']}"
    allowed = [slot["allowed"] for slot in slots]
    if s.mode == "LoggingOnly":
        fill(NO_MODEL, text, allowed, seed)  # parses (its uniform draw unused): what VW
        # cannot read is never logged
        decided = ranking.logging_only_slots(slots)
    else:
        decided = ranking.check_slots(fill(served, text, allowed, seed))
    held = ranking.held_out(s, req, None)
    if held:
        decided = ranking.held_slots(s, slots, seed)
    decision = ranking.slots_decision(
        s, req, slots, c, decided, held=held, model_id=served.model_id, now=now
    )
    return RankedSlots(decision, ids, decided)


# ---- in a ranking process -------------------------------------------------------------------


def call_header(
    s: dict[str, Any],
    *,
    max_actions: int,
    limits: FeatureLimits,
    served: ModelRef,
    over: Mapping[str, float] | None,
    now: float,
    slots: bool = False,
) -> dict[str, Any]:
    """The header of a `rank` call (`s`: the loop's Serving.to_doc; `slots`: a multi-slot
    rank); the request's body is the call's blob."""
    return {
        "slots": slots,
        "model": (served.model_id, served.path),
        "s": s,
        "max": max_actions,
        "lim": (limits.max_features, limits.max_namespace_features, limits.max_depth),
        "over": over or None,
        "now": now,
    }


_servings: dict[str, tuple[dict[str, Any], ranking.Serving]] = {}  # by loop, in a child


def _serving(doc: dict[str, Any]) -> ranking.Serving:
    cached = _servings.get(doc["loop"])
    if cached is not None and cached[0] == doc:
        return cached[1]
    s = ranking.Serving.from_doc(doc)
    _servings[s.loop] = (doc, s)
    return s


def on_host(host: Host, s: ranking.Serving) -> tuple[Predict, Explain, Fill]:
    """The model's work for a rank of loop `s`, on `host`'s workspaces (a ranking process's, or
    LocalRanker's per thread); what VW refuses is the 400 both rankers answer."""

    last: list[Any] = [None, None]  # the last model named, and its header

    def named(model: ModelRef) -> dict[str, Any]:
        if last[0] is not model:
            last[:] = model, {"loop": s.loop, "kind": s.kind, "model": (model.model_id, model.path)}
        header: dict[str, Any] = last[1]
        return header

    def predict(model: ModelRef, features: bytes, multi: bytes) -> list[float]:
        try:
            return host.scores_of(named(model), features, multi)
        except Exception as exc:
            raise unreadable(exc) from None

    def explain(model: ModelRef, req: dict[str, Any]) -> list[dict[str, Any]]:
        eligible: list[bool] = req["eligible"]
        actions = [
            (a, f) for a, f, ok in zip(req["ids"], req["features"], eligible, strict=True) if ok
        ]
        try:
            return host.explanation(
                named(model),
                context=req["context"],
                actions=actions,
                eligible=eligible,
                ids=req["ids"],
                epsilon=s.exploration,
            )
        except Exception as exc:
            raise unreadable(exc) from None

    def fill(model: ModelRef, text: bytes, allowed: list[list[int]], seed: str) -> ranking.Decided:
        try:
            return host.fill_slots(named(model), text, allowed, seed)
        except Exception as exc:
            raise unreadable(exc) from None

    return predict, explain, fill


def rank_op(host: Host, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
    """The `rank` operation of a ranking process (learners.sandbox.host.Op): the request's body
    in, out either {"refused": [status, code, message]} or the answer (eventId, the digests a
    retry is told by, the action served) with the response and the records as the blob."""
    s = _serving(header["s"])
    predict, explain, fill = on_host(host, s)
    common: dict[str, Any] = {
        "max_actions": int(header["max"]),
        "limits": FeatureLimits(*header["lim"]),
        "served": ModelRef(*header["model"]),
        "now": float(header["now"]),
    }
    try:
        body = load_json(blob, "InvalidRankRequest")
        ranked: Ranked | RankedSlots
        if header.get("slots"):
            ranked = rank_slots(s, body, fill=fill, **common)
            what, repeat = "actions or slots", body.get("slots")
        else:
            ranked = rank(s, body, predict=predict, explain=explain, over=header["over"], **common)
            what, repeat = "actions", body.get("excludedActions")
    except ApiError as exc:
        return {"refused": (exc.status, exc.code, exc.message)}, b""
    ask = asked(body, ranked.event_id, [ranked.ids, repeat], what)
    response = orjson.dumps(ranked.document())
    records = ranked.records()
    answer = {
        "id": ask.event_id,
        "request": ask.request.hex(),
        "actions": ask.actions.hex(),
        "what": what,
        # The action served, for the exposure caps' counts (single-slot loops have them).
        "chosen": ranked.chosen if isinstance(ranked, Ranked) else None,
        "online": s.mode == "Online",
        "sizes": [len(response), *(len(r) for r in records)],
    }
    return answer, response + b"".join(records)


@dataclass(frozen=True, slots=True)
class Answer:
    """A ranking process's answer to a `rank` call, as the serving process uses it."""

    ask: Asked
    chosen: str | None
    online: bool
    response: bytes
    records: list[bytes]


def read_answer(value: dict[str, Any], blob: bytes) -> Answer:
    """What `rank_op` answered; the ApiError it refused the request with."""
    refused = value.get("refused")
    if refused is not None:
        status, code, message = refused
        raise ApiError(int(status), str(code), str(message))
    parts, at = [], 0
    for size in value["sizes"]:
        parts.append(blob[at : at + size])
        at += size
    ask = Asked(
        value["id"], bytes.fromhex(value["request"]), bytes.fromhex(value["actions"]), value["what"]
    )
    return Answer(ask, value["chosen"], bool(value["online"]), parts[0], parts[1:])
