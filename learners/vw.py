"""The only module that imports vowpalwabbit: workspaces, model bytes and policy arguments.

A workspace is not thread-safe; every caller owns its own and swaps whole objects, never shares.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path

import orjson
from vowpalwabbit import Workspace
from vowpalwabbit.pyvw import pylibvw

# Options that read or write files, open sockets or change how input is read: a policy is
# arguments for the learning algorithm only, and the service owns all I/O.
_FORBIDDEN = {
    "-d",
    "--data",
    "-f",
    "--final_regressor",
    "-i",
    "--initial_regressor",
    "-c",
    "--cache",
    "--cache_file",
    "-p",
    "--predictions",
    "-r",
    "--raw_predictions",
    "--readable_model",
    "--invert_hash",
    "--daemon",
    "--port",
    "--pid_file",
    "--port_file",
    "--save_per_pass",
    "--output_feature_regularizer_binary",
    "--output_feature_regularizer_text",
    "--input_feature_regularizer",
    "--feature_mask",
    "--json",
    "--dsjson",
    "--passes",
    "--audit",
    "--audit_regressor",
    "--sendto",
    "--compressed",
    "--examples",
    "--ring_size",
    "--extra_metrics",
    "--dictionary",
    "--dictionary_path",
    "--flatbuffer",
    "--id",
    "--save_resume",
    "--predict_only_model",
    "-t",
    "--testonly",
    "--holdout_off",
    "--chain_hash",
    "--progress",
    "-P",
    "--limit_output",
    "--help",
    "-h",
    "--version",
    "--cats",
    "--cb_explore",
    "--slates",
}


class PolicyError(ValueError):
    """Policy arguments that dloop cannot run; the message says why."""


def tokens(args: str) -> list[str]:
    try:
        return shlex.split(args)
    except ValueError as exc:
        raise PolicyError(f"cannot split arguments: {exc}") from None


def algorithm(kind: str) -> str:
    """The VW reduction a loop kind trains: a bandit explores in VW, an RL loop's Q model is a
    plain `--cb_adf` regressor that dloop explores around (learners.rl)."""
    return {"rl": "--cb_adf", "ccb": "--ccb_explore_adf"}.get(kind, "--cb_explore_adf")


def check_policy(args: str, *, algorithm: str = "--cb_explore_adf") -> None:
    """Raise PolicyError unless `args` is a VW command line dloop may train and serve."""
    if len(args) > 1024:
        raise PolicyError("policy arguments are limited to 1024 characters")
    parts = tokens(args)
    if algorithm not in parts:
        raise PolicyError(f"policy arguments must contain {algorithm}")
    others = {"--cb_adf", "--cb_explore_adf", "--ccb_explore_adf"} - {algorithm}
    if others & set(parts):
        raise PolicyError(f"this loop's policy must use {algorithm}, not {' '.join(others)}")
    for part in parts:
        name = part.split("=", 1)[0]
        if name in _FORBIDDEN:
            raise PolicyError(f"option {name} is not allowed in a policy")
    try:
        ws = Workspace(f"{args} --quiet")
    except Exception as exc:  # VW raises RuntimeError subclasses with its own message
        raise PolicyError(f"Vowpal Wabbit rejected the arguments: {exc}") from None
    ws.finish()


def with_exploration(args: str, exploration: float) -> str:
    """Apply explorationPercentage to a policy, as Personalizer rewrites `--epsilon`.

    SquareCB has no epsilon of its own: its exploration is set by `--gamma_scale`, larger meaning
    greedier. dloop maps epsilon to gamma_scale = 2 / epsilon, so Personalizer's default 0.2 gives
    VW's default gamma_scale of 10 and epsilon 0 gives a greedy policy. Every other algorithm gets
    `--epsilon`.
    """
    parts = tokens(args)
    if "--squarecb" in parts:
        name, value = "--gamma_scale", (2.0 / exploration if exploration > 0 else 1e6)
    else:
        name, value = "--epsilon", exploration
    out: list[str] = []
    skip = False
    for part in parts:
        if skip:
            skip = False
            continue
        if part == name:
            skip = True
            continue
        if part.startswith(name + "="):
            continue
        out.append(part)
    out += [name, f"{value:g}"]
    return shlex.join(out)


def workspace(args: str, model: bytes | None = None) -> Workspace:
    """A workspace for `args`; with `model`, the model's saved options plus `args` (I/O flags)."""
    if model is None:
        return Workspace(f"{args} --quiet")
    fd, path = tempfile.mkstemp(prefix="dloop-model-", suffix=".vw")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        return Workspace(f"{args} --quiet -i {shlex.quote(path)}")
    finally:
        Path(path).unlink(missing_ok=True)


def workspace_file(args: str, path: str) -> Workspace:
    """A workspace for the model saved in `path`, plus `args` (I/O flags)."""
    return Workspace(f"{args} --quiet -i {shlex.quote(path)}")


def model_bytes(ws: Workspace) -> bytes:
    fd, path = tempfile.mkstemp(prefix="dloop-model-", suffix=".vw")
    os.close(fd)
    try:
        ws.save(path)
        return Path(path).read_bytes()
    finally:
        Path(path).unlink(missing_ok=True)


def check_model(model: bytes, *, kind: str = "cb") -> None:
    """Raise PolicyError unless `model` is a VW model a loop of this kind can serve."""
    try:
        ws = workspace("--json", model)
    except Exception as exc:
        raise PolicyError(f"not a Vowpal Wabbit model: {exc}") from None
    expected = algorithm(kind)
    try:
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
    finally:
        ws.finish()


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
