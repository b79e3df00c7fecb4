"""What a sandbox child (learners.sandbox) does with each call: VW work on its own workspaces.

Loaded into the forkserver before any child is forked, so every child starts with VW imported.
Nothing here talks to a database, a broker or the network; the only file it reads is a model
file the parent wrote.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from learners import vw
from learners.base import EpisodeTrainer, LineTrainer
from learners.cb import CBTrainer
from learners.ccb import CCBRanker
from learners.features import context_json, with_json
from learners.importance import explain
from learners.rl import RLTrainer, Step, epsilon_greedy
from learners.sampling import restrict
from learners.vw import Workspace

# The parser each loop kind's examples need (prediction without a model only parses).
_PARSE_ARGS = {"cb": "--cb_explore_adf", "rl": "--cb_adf", "ccb": "--ccb_explore_adf"}

# An operation the sandbox's owner adds (`Host(ops=...)`): called with the host (its models:
# `scores`, `explanation`), the call's header and blob; returns the answer and a blob. A
# module-level function, so a child receives it by name (service.core.ranks.rank_op runs the
# server's whole rank next to the model this way, off the serving process).
Op = Callable[["Host", dict[str, Any], bytes], tuple[Any, bytes]]


class Host:
    def __init__(self, cache_models: int = 64, ops: Mapping[str, Op] | None = None) -> None:
        self.cache_models = cache_models
        self.ops = dict(ops or {})
        self.rankers: OrderedDict[str, tuple[str, vw.Scorer]] = OrderedDict()
        self.kept = vw.KeptActions()  # the parsed action lists the rankers keep, in all
        self.parsers: dict[str, Workspace] = {}
        self.trainers: dict[str, LineTrainer | EpisodeTrainer] = {}

    def handle(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        op = header["op"]
        added = self.ops.get(op)
        if added is not None:
            return added(self, header, blob)
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ValueError(f"unknown operation {op!r}")
        out: tuple[Any, bytes] = handler(header, blob)
        return out

    # ---- serving ----

    def _ranker(self, header: dict[str, Any]) -> vw.Scorer | None:
        """The loop's model (loaded from its file once, then kept: least recently used first
        out), or None if the loop has none yet."""
        loop: str = header["loop"]
        model_id, path = header["model"]
        if path is None:
            return None
        cached = self.rankers.get(loop)
        if cached is not None and cached[0] == model_id:
            self.rankers.move_to_end(loop)
            return cached[1]
        scorer = vw.Scorer(vw.workspace_file("--json", path), self.kept)
        if cached is not None:
            cached[1].finish()
        self.rankers[loop] = (model_id, scorer)
        self.rankers.move_to_end(loop)
        while len(self.rankers) > self.cache_models:
            _, (_, old) = self.rankers.popitem(last=False)
            old.finish()
        return scorer

    def _parser(self, kind: str) -> Workspace:
        ws = self.parsers.get(kind)
        if ws is None:
            ws = self.parsers[kind] = vw.workspace(f"{_PARSE_ARGS[kind]} --json")
        return ws

    def scores(self, header: dict[str, Any], text: str) -> list[float]:
        """The scores of the model `header` names (its `loop`, `kind`, `model`) for one
        example; [] without a model, after parsing `text` all the same."""
        scorer = self._ranker(header)
        if scorer is None:
            vw.parse_only(self._parser(header["kind"]), text)
            return []
        return vw.predict_scores(scorer.ws, text)

    def scores_of(self, header: dict[str, Any], features: bytes, multi: bytes) -> list[float]:
        """`scores` of the example of the context `features` and actions `multi` (their JSON),
        with the model's parsed actions kept for the next rank of the same list (vw.Scorer)."""
        scorer = self._ranker(header)
        if scorer is None:
            vw.parse_only(self._parser(header["kind"]), with_json(features, multi).decode())
            return []
        return scorer.scores(features, multi)

    def op_predict(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        return self.scores(header, blob.decode()), b""

    def fill_slots(
        self, header: dict[str, Any], blob: bytes, allowed: list[list[int]], seed: str
    ) -> list[tuple[int, list[int], list[float]]]:
        """learners.ccb.CCBRanker.rank of the multi-slot context `blob` (its JSON) with the
        model `header` names (uniform per slot without one, after parsing all the same)."""
        scorer = self._ranker(header)
        c = orjson.loads(blob)
        if scorer is None:
            vw.parse_only(self._parser("ccb"), blob.decode())
        return CCBRanker.loaded(None if scorer is None else scorer.ws).rank(c, allowed, seed)

    def explanation(
        self,
        header: dict[str, Any],
        *,
        context: list[dict[str, Any]],
        actions: list[tuple[str, Any]],
        eligible: list[bool],
        ids: list[str],
        epsilon: float,
    ) -> list[dict[str, Any]]:
        """Per action, the context features that moved its probability most under the model
        `header` names (learners.importance); no features without a model."""
        scorer = self._ranker(header)
        if scorer is None:
            return [{"id": a, "features": []} for a in ids]
        ws = scorer.ws
        rl = header["kind"] == "rl"

        def predict(context: list[dict[str, Any]]) -> list[float]:
            scores = vw.predict_scores(ws, context_json(context, actions).decode())
            pmf = iter(epsilon_greedy(scores, epsilon) if rl else scores)
            return restrict([next(pmf) if ok else 0.0 for ok in eligible], eligible)

        return explain(predict, context, ids)

    # ---- checks ----

    def op_check_model(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        vw.check_model(blob, kind=header["kind"])
        return None, b""

    def op_check_policy(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        vw.check_policy(header["args"], algorithm=header["algorithm"])
        return None, b""

    def op_blank(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        trainer = CBTrainer(header["args"])
        try:
            return None, trainer.to_bytes()
        finally:
            trainer.close()

    def op_parse(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        """Parse examples (one per line) with `args`; (index, message) of those VW refused (the
        parser fuzzer)."""
        ws = vw.workspace(header["args"])
        refused: list[tuple[int, str]] = []
        try:
            for i, text in enumerate(blob.decode().split("\n")):
                try:
                    vw.parse_only(ws, text)
                except Exception as exc:
                    refused.append((i, f"{type(exc).__name__}: {exc}"[:1000]))
        finally:
            ws.finish()
        return refused, b""

    # ---- learning ----

    def op_open(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        key: str = header["key"]
        self._drop(key)
        model = blob or None
        if header["kind"] == "rl":
            self.trainers[key] = RLTrainer(
                header["args"], model, int(header["examples"]), gamma=float(header["gamma"])
            )
        else:
            self.trainers[key] = CBTrainer(header["args"], model, int(header["examples"]))
        return None, b""

    def op_learn(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        trainer = self.trainers[header["key"]]
        assert isinstance(trainer, CBTrainer)
        errors: list[tuple[int, str]] = []
        for i, line in enumerate(blob.decode().split("\n")):
            try:
                trainer.learn_text(line)
            except Exception as exc:  # VW refused this line; the others still learn
                errors.append((i, f"{type(exc).__name__}: {exc}"[:1000]))
        return {"examples": trainer.examples, "errors": errors}, b""

    def op_learn_episodes(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        trainer = self.trainers[header["key"]]
        assert isinstance(trainer, RLTrainer)
        trainer.gamma = float(header["gamma"])
        errors: list[tuple[int, str]] = []
        for i, (steps, terminated) in enumerate(header["episodes"]):
            try:
                trainer.learn_episode(
                    [Step(line, float(r), bool(ok)) for line, r, ok in steps], bool(terminated)
                )
            except Exception as exc:
                errors.append((i, f"{type(exc).__name__}: {exc}"[:1000]))
        return {"examples": trainer.examples, "errors": errors}, b""

    def op_remember_episodes(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        trainer = self.trainers[header["key"]]
        assert isinstance(trainer, RLTrainer)
        trainer.remember(
            [
                ([Step(line, float(r), bool(ok)) for line, r, ok in steps], bool(terminated))
                for steps, terminated in header["episodes"]
            ]
        )
        return None, b""

    def op_save(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        trainer = self.trainers[header["key"]]
        return {"examples": trainer.examples}, trainer.to_bytes()

    def op_close(self, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        self._drop(header["key"])
        return None, b""

    def _drop(self, key: str) -> None:
        trainer = self.trainers.pop(key, None)
        if trainer is not None:
            trainer.close()
