"""The only module that imports vowpalwabbit: workspaces, model bytes and policy arguments.

A workspace is not thread-safe; every caller owns its own and swaps whole objects, never shares.
"""

from __future__ import annotations

import os
import re
import shlex
import struct
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
    "--dump_json_weights_experimental",
    "--epsilon_decay_audit",
    "--search_allowed_transitions",
    "--span_server",
    "--span_server_port",
    "--unique_id",
    "--total",
    "--node",
    "--csv",
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


def _check_names(args: str, *, allowed: frozenset[str] = frozenset()) -> None:
    """Raise PolicyError if `args` names a forbidden option in any spelling VW accepts
    (`--name value`, `--name=value`, `-xvalue`). Both shell-style and plain whitespace splitting
    are checked, so a quoting trick that hides an option from one splitter cannot get it past
    VW's own."""
    for part in (*tokens(args), *args.split()):
        if not part.startswith("-"):
            continue
        name = part.split("=", 1)[0] if part.startswith("--") else part[:2]
        if name in _FORBIDDEN and name not in allowed:
            raise PolicyError(f"option {name} is not allowed in a policy")


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
    _check_names(args)
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


def model_bytes(ws: Workspace) -> bytes:
    fd, path = tempfile.mkstemp(prefix="dloop-model-", suffix=".vw")
    os.close(fd)
    try:
        ws.save(path)
        return Path(path).read_bytes()
    finally:
        Path(path).unlink(missing_ok=True)


_U32 = struct.Struct("<I")
_VERSION = re.compile(rb"(\d{1,4})\.(\d{1,4})\.(\d{1,4})")
# VW 8.0.3 gave the header its current layout (an id, no legacy interaction lists).
_OLDEST = (8, 0, 3)


def header_options(model: bytes) -> str:
    """The command line a model's header hands VW, read without VW and built as VW 9.11.9's
    `save_load_header` builds it: ` --id`, ` --bit_precision`, ` --ngram` and ` --skips` from
    their fields, then the stored options up to their first NUL. VW acts on these options while
    it loads the model (some name files to write), so they are checked before VW sees it.

    Layout (VW >= 8.0.3): version and id (u32 length + C string), b"m", min and max label,
    bits and lda (4 bytes each), ngram and skip counts (u32) each followed by 3-byte entries,
    options (u32 length + C string), then the checksum VW verifies itself.
    """
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(model):
            raise PolicyError("not a Vowpal Wabbit model: its header is cut short")
        pos += n
        return model[pos - n : pos]

    def u32() -> int:
        value: int = _U32.unpack(take(4))[0]
        return value

    def c_string(raw: bytes) -> str:
        return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")

    version = take(u32()).split(b"\0", 1)[0]
    m = _VERSION.fullmatch(version)
    if m is None:
        raise PolicyError("not a Vowpal Wabbit model: no version in its header")
    if tuple(int(g) for g in m.groups()) < _OLDEST:
        raise PolicyError(f"models from Vowpal Wabbit {version.decode()} are not supported")
    options = ""
    model_id = c_string(take(u32()))
    if model_id:
        options += f" --id {model_id}"
    if take(1) != b"m":
        raise PolicyError("not a Vowpal Wabbit model")
    take(8)  # min and max label
    options += f" --bit_precision {u32()}"
    take(4)  # lda
    for name in ("--ngram", "--skips"):
        for _ in range(u32()):
            options += f" {name} {c_string(take(3))}"
    return options + " " + c_string(take(u32()))


def check_model(model: bytes, *, kind: str = "cb") -> None:
    """Raise PolicyError unless `model` is a whole VW model a loop of this kind can serve.

    Its header may not name options a policy may not (files, sockets). VW reads a model until
    the end of the file and drops a partial last weight record without a word, so the model
    is loaded and saved again (resumable, then predict-only): the copy must be exactly as long
    as the input, which it is not when bytes were cut from or added to the end. A cut that
    falls exactly between two weight records, and a changed weight, still load: only the
    signed export (an HMAC over the bytes) detects those.
    """
    _check_names(header_options(model), allowed=frozenset({"--id"}))
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
