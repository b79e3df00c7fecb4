"""The only module that imports vowpalwabbit: workspaces, model bytes, prediction and learning,
and the checks that need VW itself (learners.policy checks arguments without it).

A workspace is not thread-safe; every caller owns its own and swaps whole objects, never shares.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from collections import OrderedDict
from pathlib import Path

import orjson
from vowpalwabbit import Workspace as Workspace
from vowpalwabbit.pyvw import pylibvw

from learners.features import with_json
from learners.policy import (
    PolicyError,
    algorithm,
    check_arguments,
    check_names,
    header_options,
    without_cross,
)


def check_policy(args: str, *, algorithm: str = "--cb_explore_adf") -> None:
    """Raise PolicyError unless `args` is a VW command line dloop may train and serve: allowed
    learning options only (learners.policy), the loop's own reduction, within the caps.

    Touches no file: with only allowed options VW opens none, so after dloop's own checks a
    workspace is built to let VW refuse bad combinations; its message, which can then only name
    allowed options and checked values, is passed on as one line.
    """
    check_arguments(args, algorithm=algorithm)
    try:
        plain = without_cross(args)
        ws = Workspace(f"{_sparse(plain, _bits_of_args(plain))} --quiet")
    except Exception as exc:  # VW raises RuntimeError subclasses with its own message
        reason = " ".join(str(exc).split())[:300]
        raise PolicyError(f"Vowpal Wabbit rejected the arguments: {reason}") from None
    ws.finish()


# Above this many bits of weights, a workspace keeps them in a hash map of the weights touched
# (`--sparse_weights`) instead of an array of all of them: 2^22 weights of 4 floats are 64 MB in
# every ranker and learner of a loop, where a table-like RL model touches a few thousand. VW does
# not keep the option in a saved model, so every workspace made here adds it by the model's bits.
DENSE_BITS = 20


def _sparse(args: str, bits: int | None) -> str:
    if bits is not None and bits > DENSE_BITS and "--sparse_weights" not in args.split():
        return f"{args} --sparse_weights"
    return args


def _bits_of_args(args: str) -> int | None:
    """The bits `args` set, in any spelling VW reads (`-b 22`, `-b22`, `--bit_precision 22`,
    `--bit_precision=22`); None if they set none."""
    words = args.split()
    for i, word in enumerate(words):
        for flag in ("--bit_precision", "-b"):
            if word == flag:
                value = words[i + 1] if i + 1 < len(words) else ""
            elif word.startswith(flag):
                value = word[len(flag) :].removeprefix("=")
            else:
                continue
            return int(value) if value.isdigit() else None
    return None


def _bits_of_model(model: bytes) -> int | None:
    """The model's bits, None if its header cannot be read (VW then says what is wrong)."""
    try:
        words = header_options(model).split()
    except PolicyError:
        return None
    return int(words[words.index("--bit_precision") + 1]) if "--bit_precision" in words else None


def workspace(args: str, model: bytes | None = None) -> Workspace:
    """A workspace for `args`; with `model`, the model's saved options plus `args` (I/O flags).
    dloop's own policy option (learners.policy.CROSS) is left out: learners.rl resolves it.
    Weights beyond DENSE_BITS bits are sparse."""
    if model is None:
        args = without_cross(args)
        return Workspace(f"{_sparse(args, _bits_of_args(args))} --quiet")
    fd, path = tempfile.mkstemp(prefix="dloop-model-", suffix=".vw")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        return Workspace(f"{_sparse(args, _bits_of_model(model))} --quiet -i {shlex.quote(path)}")
    finally:
        Path(path).unlink(missing_ok=True)


def workspace_file(args: str, path: str) -> Workspace:
    """A workspace for the model saved in `path`, plus `args` (I/O flags); sparse weights as
    `workspace` has them."""
    with open(path, "rb") as f:
        model = f.read()
    return Workspace(f"{_sparse(args, _bits_of_model(model))} --quiet -i {shlex.quote(path)}")


def model_bytes(ws: Workspace) -> bytes:
    fd, path = tempfile.mkstemp(prefix="dloop-model-", suffix=".vw")
    os.close(fd)
    try:
        ws.save(path)
        return Path(path).read_bytes()
    finally:
        Path(path).unlink(missing_ok=True)


def check_model(model: bytes, *, kind: str = "cb") -> None:
    """Raise PolicyError unless `model` is a whole VW model a loop of this kind can serve.

    Its header may not name options a policy may not (files, sockets). VW reads a model until
    the end of the file and drops a partial last weight record without a word, so the model
    is loaded and saved again (resumable, then predict-only): the copy must be exactly as long
    as the input, which it is not when bytes were cut from or added to the end. A cut that
    falls exactly between two weight records, and a changed weight, still load: only the
    signed export (an HMAC over the bytes) detects those.
    """
    check_names(header_options(model), allowed=frozenset({"--id"}))
    expected = algorithm(kind)
    for extra in ("", " --predict_only_model"):
        try:
            ws = workspace(f"--preserve_performance_counters{extra}", model)
        except Exception as exc:
            raise PolicyError(f"not a Vowpal Wabbit model: {exc}") from None
        try:
            if not extra:
                _check_reduction(ws, expected)
            size = len(model_bytes(ws))
        finally:
            ws.finish()
        if size == len(model):
            return
    raise PolicyError("the model is incomplete or has bytes after its end")


def _check_reduction(ws: Workspace, expected: str) -> None:
    learners = ws.get_enabled_learners()
    # The outermost contextual-bandit reduction the model stacks (all of them on cb_adf).
    found = next(
        (
            f"--{name}"
            for name in ("ccb_explore_adf", "cb_explore_adf")
            if any(n.startswith(name) for n in learners)
        ),
        "--cb_adf",
    )
    if found != expected or "cb_adf" not in learners:
        raise PolicyError(f"the model is not a {expected} model")


# pyvw wraps every parsed example in a Python object (with label-type lookups and enum calls),
# which costs about twice VW's own parse and predict: 43 us against 13 us for a 10-action rank.
# The hot paths call the pylibvw methods pyvw itself calls, without the wrappers.


def predict_scores(ws: Workspace, text: str) -> list[float]:
    """Parse one multi-line JSON/DSJSON example and return its prediction by action index: the
    probabilities of a `--cb_explore_adf` model, the predicted costs of a `--cb_adf` one."""
    examples = pylibvw.vw._parse(ws, text)
    try:
        pylibvw.vw.predict_multi(ws, examples)
        scores: list[float] = examples[0].get_action_scores()
        return scores
    finally:
        pylibvw.vw._finish_example_multi_ex(ws, examples)


class KeptActions:
    """The parsed action examples that the scorers (Scorer) of one thread or process keep, by
    model and action list, at most `examples` of them, the least recently used given back
    first. A kept example costs about 20 KB (VW's example holds a feature group for each of
    its 256 namespaces): 512 of them, the default, are about 10 MB."""

    def __init__(self, examples: int = 512) -> None:
        self.examples = examples
        self.count = 0
        self._lru: OrderedDict[tuple[int, bytes], tuple[Scorer, list[object]]] = OrderedDict()

    def get(self, scorer: Scorer, multi: bytes) -> list[object] | None:
        key = (id(scorer), multi)
        hit = self._lru.get(key)
        if hit is None:
            return None
        self._lru.move_to_end(key)
        return hit[1]

    def keep(self, scorer: Scorer, multi: bytes, examples: list[object]) -> None:
        """Keep `examples` (`scorer`'s, parsed from `multi`), or give them back if they alone
        are more than the budget."""
        if len(examples) > self.examples:
            scorer.give_back(examples)
            return
        self._lru[(id(scorer), multi)] = (scorer, examples)
        self.count += len(examples)
        while self.count > self.examples:
            _, (owner, old) = self._lru.popitem(last=False)
            self.count -= len(old)
            owner.give_back(old)

    def drop(self, scorer: Scorer) -> None:
        """Give back every example `scorer` keeps (before its workspace is finished)."""
        for key in [key for key, (owner, _) in self._lru.items() if owner is scorer]:
            _, old = self._lru.pop(key)
            self.count -= len(old)
            scorer.give_back(old)


class Scorer:
    """A served model's workspace that keeps the parsed examples of the action lists it scores
    (in `kept`, shared by the scorers of one thread or process): an application ranks the same
    catalogue again and again with the context changing, and VW's parse is two thirds of a
    10-action parse+predict (7 of 11 us). A rank then parses its context alone (a shared
    example, `{"FromUrl": ..., "_multi": []}`) and predicts it with the kept action examples:
    the same scores as parsing the whole example (predicting leaves an example as it found it;
    tested on every exploration algorithm a policy may hold). A list is kept from its second
    rank on: parsing the two parts apart costs more than parsing them together (20 against
    13 us for 10 actions), which a list ranked once (an app's own candidates per request) would
    pay for nothing. Lists of more than `max_bytes` of JSON are parsed whole every time. Like
    its workspace, not thread-safe."""

    SEEN = 4096  # the lists seen once that are remembered (by hash) until seen again

    def __init__(
        self, ws: Workspace, kept: KeptActions | None = None, max_bytes: int = 16 * 1024
    ) -> None:
        self.ws = ws
        self.kept = kept if kept is not None else KeptActions()
        self.max_bytes = max_bytes
        self._seen: OrderedDict[int, None] = OrderedDict()

    def scores(self, features: bytes, multi: bytes) -> list[float]:
        """predict_scores of the example `{"FromUrl": features, "_multi": multi}`: `features`
        the context's JSON, `multi` the actions' (learners.features.actions_json)."""
        actions = self.kept.get(self, multi)
        if actions is None and (len(multi) > self.max_bytes or not self._again(multi)):
            return predict_scores(self.ws, with_json(features, multi).decode())
        shared = pylibvw.vw._parse(self.ws, with_json(features, b"[]").decode())
        fresh: list[object] | None = None
        try:
            if actions is None:
                examples = pylibvw.vw._parse(self.ws, with_json(b"[]", multi).decode())
                pylibvw.vw._finish_example_multi_ex(self.ws, examples[:1])
                actions = fresh = list(examples[1:])
            pylibvw.vw.predict_multi(self.ws, shared + actions)
            scores: list[float] = shared[0].get_action_scores()
            if fresh is not None:
                self.kept.keep(self, multi, fresh)
                fresh = None
            return scores
        finally:
            pylibvw.vw._finish_example_multi_ex(self.ws, shared)
            if fresh is not None:
                self.give_back(fresh)

    def _again(self, multi: bytes) -> bool:
        """Whether `multi` was seen before (a hash collision only keeps a list early)."""
        key = hash(multi)
        if key in self._seen:
            del self._seen[key]
            return True
        self._seen[key] = None
        if len(self._seen) > self.SEEN:
            self._seen.popitem(last=False)
        return False

    def give_back(self, examples: list[object]) -> None:
        pylibvw.vw._finish_example_multi_ex(self.ws, examples)

    def finish(self) -> None:
        """Give the kept examples back to VW, then finish the workspace."""
        self.kept.drop(self)
        self.ws.finish()


def namespaces(ws: Workspace, text: str) -> tuple[set[int], set[int]]:
    """The namespaces (VW's one-byte indices, without the constant's) of one multi-line
    DSJSON example's shared features and of its actions' features."""
    actions = len(orjson.loads(text)["c"]["_multi"])
    examples = pylibvw.vw._parse(ws, text)
    try:
        found = [
            {ex.namespace(i) for i in range(ex.num_namespaces())} - {_CONSTANT} for ex in examples
        ]
    finally:
        if examples:
            pylibvw.vw._finish_example_multi_ex(ws, examples)
    shared = found[0] if len(found) > actions else set()
    return shared, set().union(*found[len(found) - actions :])


# VW's namespace index for the constant feature.
_CONSTANT = 128


def parse_only(ws: Workspace, text: str) -> None:
    """Parse one multi-line JSON/DSJSON example and drop it: only whether VW can read it."""
    examples = pylibvw.vw._parse(ws, text)
    if examples:
        pylibvw.vw._finish_example_multi_ex(ws, examples)


def predict_decisions(ws: Workspace, text: str) -> list[list[tuple[int, float]]]:
    """Parse one CCB example and return, per slot, (action index, probability) pairs."""
    examples = pylibvw.vw._parse(ws, text)
    try:
        pylibvw.vw.predict_multi(ws, examples)
        decisions: list[list[tuple[int, float]]] = examples[0].get_decision_scores()
        return decisions
    finally:
        pylibvw.vw._finish_example_multi_ex(ws, examples)


def learn_line(ws: Workspace, text: str) -> bool:
    """Learn one DSJSON line; False if VW dropped it (skipped or without actions)."""
    if "_skipLearn" in text and orjson.loads(text).get("_skipLearn"):
        # VW learns nothing from a skipped line, and VW 9.11.9 crashes (SIGSEGV) learning a
        # skipped multi-slot one: never hand it one.
        return False
    examples = pylibvw.vw._parse(ws, text)
    try:
        if len(examples) <= 1:
            return False
        pylibvw.vw.learn_multi(ws, examples)
        return True
    finally:
        if examples:
            pylibvw.vw._finish_example_multi_ex(ws, examples)
