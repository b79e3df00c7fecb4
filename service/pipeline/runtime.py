"""In-memory state of each loop that serving needs: settings, the served model, recent answers.

A loop's `LoopRuntime` is updated in place: `publish` points `served` at a new model and a
configuration change replaces `config`, `policy` and `settings`. The served model itself is
never changed: a `ModelRef` (an id and the file the model was written to) is immutable and
replaced whole, and the previous model's file is kept (learners.sandbox.write_model). So a
request reads `rt.served` once and ranks with that model and reports its id to the end, while
the next request sees the new one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from learners.constraints import ExposureCaps
from learners.guardrails import FALLBACK_PROBE
from learners.policy import with_exploration
from learners.sandbox import NO_MODEL, ModelRef, write_model
from service.core.kinds import LoopKind, loop_kind
from service.core.ranking import Serving
from service.core.schemas import LoopSettings
from service.storage import store


@dataclass
class LoopRuntime:
    name: str
    kind: str
    config: dict[str, Any]
    policy: dict[str, str]
    settings: LoopSettings
    # The served model, swapped whole so a request never pairs a model with another's id. The
    # ranking children (learners.sandbox.RankerPool) load it from its file.
    served: ModelRef = NO_MODEL
    # A guardrail put the loop in fallback (service.pipeline.guardrails).
    fallback: bool = False
    # Exposure caps' sliding counts in this process (learners.constraints), if it has caps.
    exposure: ExposureCaps | None = None
    _serving_doc: tuple[LoopSettings, str, bool, dict[str, Any]] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def serving(self) -> Serving:
        """What a decision needs of this loop (service.core.ranking)."""
        k = self.loop_kind
        return Serving(
            loop=self.name,
            kind=self.kind,
            mode=self.settings.mode,
            holdout_share=self.holdout_share,
            holdout_policy=self.settings.holdout_policy,
            exploration=self.settings.exploration,
            explores_in_vw=k.explores_in_vw,
            episodic=k.episodic,
            max_exploration=self.settings.max_exploration,
            explain=self.settings.explain,
            tiles=self.settings.tiles,
        )

    def serving_doc(self) -> dict[str, Any]:
        """`serving` in its JSON form (a rank's call to a ranking process), built again only
        when the settings or the fallback changed."""
        key = (self.settings, self.kind, self.fallback)
        cached = self._serving_doc
        if cached is None or cached[0] is not key[0] or cached[1:3] != key[1:]:
            cached = self._serving_doc = (*key, self.serving.to_doc())
        return cached[3]

    @property
    def holdout_share(self) -> float:
        """The share of decisions the holdout policy serves: the configured holdout, or in
        fallback all but learners.guardrails.FALLBACK_PROBE of them, so the model keeps being
        measured."""
        if self.fallback and self.settings.mode == "Online":
            return 1.0 - FALLBACK_PROBE
        return self.settings.holdout

    @property
    def loop_kind(self) -> LoopKind:
        return loop_kind(self.kind)

    @property
    def model_id(self) -> str:
        return self.served.model_id

    @property
    def arguments(self) -> str:
        """The VW arguments trained and served: the policy with this loop's exploration (an RL
        loop explores outside VW, see learners.rl)."""
        return trained_arguments(self.kind, self.policy, self.settings)


def trained_arguments(kind: str, policy: dict[str, str], settings: LoopSettings) -> str:
    """The VW arguments a loop of `kind` trains and serves with `policy`: the policy with the
    loop's exploration, except for a loop that explores outside VW (RL, see learners.rl)."""
    if not loop_kind(kind).explores_in_vw:
        return policy["arguments"]
    return with_exploration(policy["arguments"], settings.exploration)


@dataclass(frozen=True, slots=True)
class Answered:
    """A rank answered for an eventId: digests of the whole request (normalised JSON) and of
    the part a repeat may not change (its actions), and the response sent."""

    request: bytes
    actions: bytes
    response: bytes


class RetryCache:
    """Recent rank answers by (loop, eventId), so a client's retry gets the original answer
    byte for byte, and a reuse of the eventId for another request can be told from a retry.
    Bounded in bytes across every loop, oldest out first, so unique eventIds cannot grow it past
    `max_bytes`. What it has forgotten it cannot tell: a repeat of an evicted eventId is ranked
    like a new one (and the joiner keeps the first decision of an eventId)."""

    OVERHEAD = 192  # bytes per entry beyond the response: key, two 16-byte digests, dict slot

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[str, str], Answered] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, loop: str, event_id: str) -> Answered | None:
        return self._items.get((loop, event_id))

    def put(self, loop: str, event_id: str, answered: Answered) -> None:
        key = (loop, event_id)
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= self._size(key, old)
        self._items[key] = answered
        self.bytes += self._size(key, answered)
        while self.bytes > self.max_bytes and self._items:
            gone, answer = self._items.popitem(last=False)
            self.bytes -= self._size(gone, answer)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def _size(self, key: tuple[str, str], answered: Answered) -> int:
        return len(answered.response) + len(key[0]) + len(key[1]) + self.OVERHEAD


class Registry:
    """The loops this process serves, by name; published models are written to `model_dir`
    for the ranking children to load."""

    def __init__(self, model_dir: Path) -> None:
        self.loops: dict[str, LoopRuntime] = {}
        self.model_dir = model_dir
        # Told the names of loops whose configuration this process changed or reloaded
        # (`configured`), and of loops whose served model or fallback it changed (`served`):
        # how the serving process and the embedded learner's process keep each other current
        # (service.pipeline.learner_process).
        self.configured: Callable[[list[str]], None] | None = None
        self.served: Callable[[list[str]], None] | None = None

    def get(self, name: str) -> LoopRuntime | None:
        return self.loops.get(name)

    def load(
        self, session: Session, names: Iterable[str] | None = None, *, quiet: bool = False
    ) -> None:
        """(Re)read loops' configuration and current model from the database: the loops in
        `names`, or every loop (forgetting those that are gone). A loop's configuration is
        parsed again only if it changed, and model bytes are read only for a model this process
        does not serve yet, so a pass over thousands of idle loops stays cheap."""
        if names is None:
            rows = list(store.list_loops(session))
            gone = set(self.loops) - {row.name for row in rows}
        else:
            wanted = set(names)
            rows = list(store.list_loops(session, names=wanted))
            gone = wanted - {row.name for row in rows}
        for name in gone:
            self.loops.pop(name, None)
        models = store.model_ids(session, names=None if names is None else [r.name for r in rows])
        fallback = store.fallback_loops(
            session, names=None if names is None else [r.name for r in rows]
        )
        for row in rows:
            rt = self.loops.get(row.name)
            if rt is None:
                settings = LoopSettings.from_doc(row.config)
                rt = LoopRuntime(row.name, row.kind, row.config, row.policy, settings)
                if settings.caps:
                    rt.exposure = ExposureCaps(settings.caps)
                self.loops[row.name] = rt
            elif rt.config != row.config or rt.policy != row.policy:
                self._configure(rt, row.config, row.policy, LoopSettings.from_doc(row.config))
            rt.fallback = row.name in fallback
            model_id = models.get(row.name)
            if model_id is None:
                if rt.served.path is not None:
                    self.publish(row.name, None, "N/A")
            elif model_id != rt.model_id:
                current = store.current_model(session, loop=row.name)
                if current is not None:
                    self.publish(row.name, current[1], current[0] if current[1] else "N/A")
        if self.configured is not None and not quiet:
            self.configured(sorted(gone | {row.name for row in rows}))

    def publish(self, name: str, model: bytes | None, model_id: str) -> None:
        rt = self.loops.get(name)
        if rt is None:
            return
        if model is None:
            rt.served = NO_MODEL  # blank: uniform ranking until the first model
        else:
            rt.served = ModelRef(model_id, write_model(self.model_dir, name, model_id, model))
        if self.served is not None:
            self.served([name])

    def set_fallback(self, name: str, fallback: bool) -> None:
        rt = self.loops.get(name)
        if rt is None:
            return
        rt.fallback = fallback
        if self.served is not None:
            self.served([name])

    def update(self, name: str, *, config: dict[str, Any], policy: dict[str, str]) -> None:
        rt = self.loops[name]
        self._configure(rt, config, policy, LoopSettings.from_doc(config))
        if self.configured is not None:
            self.configured([name])

    @staticmethod
    def _configure(
        rt: LoopRuntime, config: dict[str, Any], policy: dict[str, str], settings: LoopSettings
    ) -> None:
        if settings.caps != rt.settings.caps:  # new caps count afresh; the same keep counting
            rt.exposure = ExposureCaps(settings.caps) if settings.caps else None
        rt.config, rt.policy, rt.settings = config, policy, settings
