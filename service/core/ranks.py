"""A whole single-slot rank, from the request to its answer and log records, done where the model
is: in one of the server's ranking processes (`rank_op`, the operation the server adds to its
learners.sandbox children, so the request's checks, features and draw run beside VW and off the
serving process), or in the application's own process (service.local.LocalRanker). One
implementation, so a local decision is the server's decision for the same model and request,
and both refuse the same input with the same code and message.

The serving process keeps what must be shared across requests: the key, the retry cache (it
compares the digests a rank returns), the exposure caps' counts (it sends the caps already hit,
ExposureCaps.over, and counts the action served) and the log (it appends the records).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from learners.features import FeatureLimits, context_json
from learners.sandbox import NO_MODEL, ModelRef
from service.core import ranking, record
from service.core.errors import ApiError
from service.core.requests import ID_RULE, Asked, asked, is_id, load_json, parse_rank, rank_error

if TYPE_CHECKING:
    from learners.sandbox.host import Host

# The model's scores for one example (parsing it only without a model), and per action the
# context features that moved its probability most.
Predict = Callable[[ModelRef, bytes], list[float]]
Explain = Callable[[ModelRef, dict[str, Any]], list[dict[str, Any]]]


def unreadable(exc: Exception) -> ApiError:
    """VW could not read the request: the 400 and message both rankers answer."""
    return rank_error(f"features could not be parsed: {str(exc)[:4000]}")


@dataclass(frozen=True, slots=True)
class Ranked:
    decision: record.Decision
    ids: list[str]
    pmf: list[float]
    ends_episode: bool  # an RL loop's rank without episodeId is an episode of one step

    @property
    def chosen(self) -> str:
        return self.ids[self.decision.a[0]]

    def document(self) -> dict[str, Any]:
        """The response's body."""
        return ranking.rank_document(self.decision, self.ids, self.pmf)

    def records(self) -> list[bytes]:
        """What the log gets: the decision (and the end of its one-step episode)."""
        d = self.decision
        out = [record.encode(d)]
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
    context = context_json(req["context"], list(zip(ids, req["features"], strict=True)))
    held = ranking.held_out(s, req, episode)
    if s.mode == "LoggingOnly":
        predict(NO_MODEL, context)  # only parses: what VW cannot read is never logged
        order, pmf = ranking.logging_only(req["eligible"])
    else:
        has_model = served.path is not None
        scores = predict(served, ranking.scored_context(req, context, has_model=has_model))
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
        c=context.decode(),
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
    return Ranked(decision, ids, pmf, ends_episode=s.episodic and episode is None)


# ---- in a ranking process -------------------------------------------------------------------


def call_header(
    s: dict[str, Any],
    *,
    max_actions: int,
    limits: FeatureLimits,
    served: ModelRef,
    over: Mapping[str, float] | None,
    now: float,
) -> dict[str, Any]:
    """The header of a `rank` call (`s`: the loop's Serving.to_doc); the request's body is the
    call's blob."""
    return {
        "loop": s["loop"],
        "kind": s["kind"],
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


def rank_op(host: Host, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
    """The `rank` operation of a ranking process (learners.sandbox.host.Op): the request's body
    in, out either {"refused": [status, code, message]} or the answer (eventId, the digests a
    retry is told by, the action served) with the response and the records as the blob."""
    s = _serving(header["s"])

    def predict(model: ModelRef, text: bytes) -> list[float]:
        try:
            return host.scores({**header, "model": (model.model_id, model.path)}, text.decode())
        except Exception as exc:
            raise unreadable(exc) from None

    def explain(model: ModelRef, req: dict[str, Any]) -> list[dict[str, Any]]:
        eligible: list[bool] = req["eligible"]
        actions = [
            (a, f) for a, f, ok in zip(req["ids"], req["features"], eligible, strict=True) if ok
        ]
        try:
            return host.explanation(
                header,
                context=req["context"],
                actions=actions,
                eligible=eligible,
                ids=req["ids"],
                epsilon=s.exploration,
            )
        except Exception as exc:
            raise unreadable(exc) from None

    try:
        body = load_json(blob, "InvalidRankRequest")
        ranked = rank(
            s,
            body,
            max_actions=int(header["max"]),
            limits=FeatureLimits(*header["lim"]),
            served=ModelRef(*header["model"]),
            predict=predict,
            explain=explain,
            over=header["over"],
            now=float(header["now"]),
        )
    except ApiError as exc:
        return {"refused": (exc.status, exc.code, exc.message)}, b""
    ask = asked(body, ranked.decision.id, [ranked.ids, body.get("excludedActions")], "actions")
    response = orjson.dumps(ranked.document())
    records = ranked.records()
    answer = {
        "id": ask.event_id,
        "request": ask.request.hex(),
        "actions": ask.actions.hex(),
        "chosen": ranked.chosen,
        "online": s.mode == "Online",
        "sizes": [len(response), *(len(r) for r in records)],
    }
    return answer, response + b"".join(records)


@dataclass(frozen=True, slots=True)
class Answer:
    """A ranking process's answer to a `rank` call, as the serving process uses it."""

    ask: Asked
    chosen: str
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
        value["id"], bytes.fromhex(value["request"]), bytes.fromhex(value["actions"]), "actions"
    )
    return Answer(ask, value["chosen"], bool(value["online"]), parts[0], parts[1:])
