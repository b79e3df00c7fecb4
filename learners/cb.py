"""Contextual-bandit learner on VW `--cb_explore_adf`.

Serving and training use separate workspaces built from the same bytes: `CBRanker` parses the
decision's `c` JSON with `--json`, `CBTrainer` parses the joined DSJSON line with `--dsjson`, so
the features are identical by construction (see learners.features).
"""

from __future__ import annotations

from learners import vw

DEFAULT_POLICY = "--cb_explore_adf --squarecb -q ::"
PERSONALIZER_POLICY = "--cb_explore_adf --epsilon 0.2 --power_t 0 -l 0.001 --cb_type mtr -q ::"
NAMED_POLICIES = {
    "dloop-default": DEFAULT_POLICY,
    "personalizer-default": PERSONALIZER_POLICY,
    "vw-default": "--cb_explore_adf -q ::",
}


class CBRanker:
    """Ranks with a trained model: `predict` returns the policy's pmf over the given actions."""

    def __init__(self, model: bytes) -> None:
        self._ws = vw.workspace("--json", model)

    def predict(self, context: bytes) -> list[float]:
        return vw.predict_scores(self._ws, context.decode())


class CBTrainer:
    """Trains `args` online from DSJSON lines; resumes exactly from `to_bytes()` output. The
    lines and arguments may be single-slot (`--cb_explore_adf`) or multi-slot
    (`--ccb_explore_adf`, learners.ccb): VW's DSJSON parser reads both."""

    def __init__(self, args: str, model: bytes | None = None, examples: int = 0) -> None:
        self.args = args
        self.examples = examples
        if model is None:
            self._ws = vw.workspace(f"{args} --dsjson --save_resume")
        else:
            self._ws = vw.workspace("--dsjson --save_resume", model)

    def learn(self, line: bytes) -> None:
        self.learn_text(line.decode())

    def learn_text(self, line: str) -> None:
        if vw.learn_line(self._ws, line):
            self.examples += 1

    def to_bytes(self) -> bytes:
        return vw.model_bytes(self._ws)

    def close(self) -> None:
        self._ws.finish()
