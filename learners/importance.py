"""Feature importance from logged decisions, and per-decision explanations.

Importance (Personalizer's leave-one-feature-out): a reward model (VW `--cb_adf` regression of
the chosen action's reward, as the doubly robust estimator uses) is trained progressively over
the log once with every feature and once without each feature in turn; a feature's importance is
how much its absence raises the progressive squared error. Scores are normalised so the most
important feature gets 1 (Personalizer reports 0-1 scores sorted descending); a feature whose
absence does not hurt scores 0. Features are (namespace, name) pairs: a nested object in the
context or an action's features is a namespace, a top-level key of a feature object is a
feature of the default namespace ("").

Explanations: for a rank request, each context feature's contribution to each action's
probability is the probability with the feature minus the probability without it (one extra
prediction per feature, at most `MAX_EXPLAINED` features; benchmarks measure the cost).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from learners import vw
from learners.evaluation import REWARD_MODEL
from learners.rl import relabel

Feature = tuple[str, str]
MAX_EXPLAINED = 20


def features_of(objects: Iterable[dict[str, Any]]) -> list[Feature]:
    out: list[Feature] = []
    for obj in objects:
        for key, value in obj.items():
            if key.startswith("_"):
                continue
            if isinstance(value, dict):
                out += [(key, k) for k in value if not k.startswith("_")]
            else:
                out.append(("", key))
    return out


def without(objects: list[dict[str, Any]], feature: Feature) -> list[dict[str, Any]]:
    ns, name = feature
    out = []
    for obj in objects:
        obj = dict(obj)
        if ns == "":
            obj.pop(name, None)
        elif isinstance(obj.get(ns), dict):
            obj[ns] = {k: v for k, v in obj[ns].items() if k != name}
        out.append(obj)
    return out


def line_features(doc: dict[str, Any]) -> list[Feature]:
    c = doc["c"]
    found = features_of(c.get("FromUrl", []))
    for action in c.get("_multi", []):
        found += features_of(action.get("j", []))
    return found


def drop_feature(doc: dict[str, Any], feature: Feature) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    c = doc["c"]
    c["FromUrl"] = without(c.get("FromUrl", []), feature)
    for action in c.get("_multi", []):
        if "j" in action:
            action["j"] = without(action["j"], feature)
    return doc


def _progressive_error(docs: list[dict[str, Any]]) -> float:
    ws = vw.workspace(f"{REWARD_MODEL} --dsjson")
    total = 0.0
    for doc in docs:
        line = orjson.dumps(doc).decode()
        predicted = -vw.predict_scores(ws, line)[doc["_labelIndex"]]
        reward = -float(doc["_label_cost"])
        total += (predicted - reward) ** 2
        vw.learn_line(ws, relabel(line, -reward))
    return total / max(len(docs), 1)


def feature_importance(
    lines: Iterable[str], *, progress: Callable[[float], None] | None = None
) -> list[dict[str, Any]]:
    """[{"namespace", "featureName", "score"}] sorted by score, highest first."""
    from learners.evaluation import read_slots

    docs = []
    for line in lines:
        doc = orjson.loads(line)
        if "_outcomes" in doc:  # multi-slot: each slot as a single-slot decision
            for logged in read_slots([line]).values():
                docs += [orjson.loads(d.line) for d in logged]
        elif "_label_cost" in doc and not doc.get("_skipLearn"):
            docs.append(doc)
    if not docs:
        return []
    candidates: list[Feature] = []
    for doc in docs:
        for f in line_features(doc):
            if f not in candidates:
                candidates.append(f)
    base = _progressive_error(docs)
    raw = {}
    for i, f in enumerate(candidates):
        raw[f] = max(0.0, _progressive_error([drop_feature(d, f) for d in docs]) - base)
        if progress is not None:
            progress((i + 1) / len(candidates))
    return _normalised(raw)


def _normalised(raw: dict[Feature, float]) -> list[dict[str, Any]]:
    """Personalizer's featureScores: the top feature 1, sorted descending."""
    top = max(raw.values(), default=0.0)
    scores = [
        {"namespace": ns, "featureName": name, "score": round(v / top, 4) if top > 0 else 0.0}
        for (ns, name), v in raw.items()
    ]
    return sorted(scores, key=lambda s: -s["score"])


def explain(
    predict: Callable[[list[dict[str, Any]]], list[float]],
    context: list[dict[str, Any]],
    action_ids: list[str],
    *,
    top: int = 5,
) -> list[dict[str, Any]]:
    """Personalizer's inferenceExplanation: per action, its top context features by absolute
    contribution to its probability (`predict` maps context features to the probabilities)."""
    full = predict(context)
    feats = features_of(context)[:MAX_EXPLAINED]
    contributions: dict[str, list[tuple[str, float]]] = {a: [] for a in action_ids}
    for f in feats:
        reduced = predict(without(context, f))
        label = f"{f[0]}.{f[1]}" if f[0] else f[1]
        for a, p, q in zip(action_ids, full, reduced, strict=True):
            contributions[a].append((label, p - q))
    return [
        {
            "id": a,
            "features": [
                {"name": name, "score": round(score, 6)}
                for name, score in sorted(contributions[a], key=lambda x: -abs(x[1]))[:top]
            ],
        }
        for a in action_ids
    ]


def model_importance(
    predict: Callable[[bytes], list[float]], lines: Iterable[str], *, sample: int = 300
) -> list[dict[str, Any]]:
    """The quick view: no retraining. For a sample of logged decisions, how far the current
    model's output moves (sum over actions of |change|) when each feature is left out,
    averaged and normalised like `feature_importance`."""
    docs = [orjson.loads(line) for line in lines]
    step = max(1, len(docs) // sample)
    docs = docs[::step][:sample]
    moved: dict[Feature, float] = {}
    for doc in docs:
        full = predict(orjson.dumps(doc["c"]))
        for f in line_features(doc):
            reduced = predict(orjson.dumps(drop_feature(doc, f)["c"]))
            moved[f] = moved.get(f, 0.0) + sum(
                abs(p - q) for p, q in zip(full, reduced, strict=True)
            )
    return _normalised(moved)
