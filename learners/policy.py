"""Policy arguments: the VW command lines a loop may train and serve, read and checked without VW.

A policy may name allowed learning options only (no files, sockets or input changes), the
loop's own reduction and one exploration algorithm, within caps on memory and CPU; a model's
header is read here too, so the options VW would act on while loading it are checked first.
"""

from __future__ import annotations

import re
import shlex
import struct
from collections.abc import Callable
from dataclasses import dataclass

# Options that read or write files, open sockets or change how input is read. A policy may hold
# only allowed learning options (policy_options); a model's header is checked against this list
# instead, since VW stores more options there than a policy may name (and acts on them).
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


@dataclass(frozen=True)
class _Value:
    """What an option's value must be; `describe` completes "must be ..." when it is not."""

    valid: Callable[[str], bool]
    describe: str


@dataclass(frozen=True)
class _Option:
    value: _Value | None = None  # None: a flag, which takes no value
    explore: bool = False  # meaningless on an RL loop's --cb_adf: dloop explores around it
    repeat: bool = False  # each occurrence adds a value (interactions, namespaces)


# Plain decimal numbers only: VW's own conversion reads "1_0", "0x1p3", "nan" differently or not.
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_WHOLE = re.compile(r"[0-9]{1,10}")
# Characters that shlex.join leaves unquoted (with_exploration rebuilds arguments with it, and VW,
# which splits at spaces only, would read quotes and backslashes literally); ':' is every namespace.
# Arguments may also hold '=' (`--opt=value`) and '/', the latter only so that a path is refused
# by the option or word that carries it, with a message that says so.
_NAMESPACES = re.compile(r"[A-Za-z0-9_@%+,.:]+")
_CHARACTERS = re.compile(r"[A-Za-z0-9_@%+,.:=/ -]*")
_NEGATIVE = re.compile(r"-\.?[0-9]")


def _number(low: float, high: float, *, whole: bool = False, why: str = "") -> _Value:
    pattern = _WHOLE if whole else _FLOAT
    span = f"from {low} to {high}" if whole else f"from {low:g} to {high:g}"
    return _Value(
        lambda v: bool(pattern.fullmatch(v)) and low <= float(v) <= high,
        f"{'a whole number' if whole else 'a number'} {span}{why}",
    )


def _choice(*choices: str) -> _Value:
    return _Value(lambda v: v in choices, f"one of {', '.join(choices)}")


def _namespaces(low: int, high: int) -> _Value:
    count = f"{low}" if low == high else f"{low} to {high}"
    return _Value(
        lambda v: bool(_NAMESPACES.fullmatch(v)) and low <= len(v) <= high,
        f"{count} namespace letters (letters, digits or _@%+,.: where : is every namespace)",
    )


# 2^22 weights of 4 floats each (the weight and VW's adaptive and normalised state) take 64 MiB,
# and a loop holds several copies of its model (serving, training, evaluation, every replica).
MAX_BITS = 22
# Bagging, cover and RND train and score every member on every example: CPU grows with the count.
MAX_MEMBERS = 16
# Each interaction multiplies the features VW hashes per action.
MAX_INTERACTIONS = 16

_BITS = _number(1, MAX_BITS, whole=True, why=" (each bit doubles the memory of every model copy)")
_MEMBERS = _number(1, MAX_MEMBERS, whole=True, why=" (each member costs CPU on every example)")
_UNIT = _number(0, 1)
_RATE = _number(0, 1000)
_BOUND = _number(-1e6, 1e6)
_SEED = _number(0, 2**32 - 1, whole=True)
_FLAG = _Option()
# dloop's own option for an RL loop's policy (learners.rl.resolve): learn state x action crosses
# only, resolved into VW's -q/--ignore_linear/--noconstant once a logged line shows the
# namespaces. VW never sees the word itself (without_cross).
CROSS = "--cross_state_action"
_EXPLORE_FLAG = _Option(explore=True)
_LIST = _Option(_namespaces(1, 64), repeat=True)

# The VW options a policy may hold: learning options only. Everything else, above all every
# option that reads or writes a file or a socket or changes how input is read, is refused by name:
# the service owns all I/O.
_OPTIONS: dict[str, _Option] = {
    # The loop kinds' reductions (check_policy wants exactly the loop's own).
    "--cb_explore_adf": _FLAG,
    "--ccb_explore_adf": _FLAG,
    "--cb_adf": _FLAG,
    # dloop's own, RL loops only (learners.rl): cross the state's namespaces with the actions'.
    CROSS: _FLAG,
    # Exploration algorithms, one at a time (_ALGORITHMS), and their parameters.
    "--epsilon": _Option(_UNIT, explore=True),
    "--squarecb": _EXPLORE_FLAG,
    "--gamma_scale": _Option(_number(0, 1e9), explore=True),
    "--gamma_exponent": _Option(_UNIT, explore=True),
    "--elim": _EXPLORE_FLAG,
    "--mellowness": _Option(_RATE, explore=True),
    "--cb_min_cost": _Option(_BOUND, explore=True),
    "--cb_max_cost": _Option(_BOUND, explore=True),
    "--regcb": _EXPLORE_FLAG,
    "--regcbopt": _EXPLORE_FLAG,
    "--bag": _Option(_MEMBERS, explore=True),
    "--greedify": _EXPLORE_FLAG,
    "--first_only": _EXPLORE_FLAG,
    "--cover": _Option(_MEMBERS, explore=True),
    "--psi": _Option(_RATE, explore=True),
    "--nounif": _EXPLORE_FLAG,
    "--first": _Option(_number(1, 10**9, whole=True), explore=True),
    "--softmax": _EXPLORE_FLAG,
    "--lambda": _Option(_RATE, explore=True),
    "--rnd": _Option(_MEMBERS, explore=True),
    "--rnd_alpha": _Option(_RATE, explore=True),
    "--rnd_invlambda": _Option(_number(0, 1e6), explore=True),
    "--synthcover": _EXPLORE_FLAG,
    "--synthcoverpsi": _Option(_RATE, explore=True),
    "--synthcoversize": _Option(_number(1, 100, whole=True), explore=True),
    # Contextual-bandit estimator.
    "--cb_type": _Option(_choice("mtr", "ips", "dr", "dm", "sm")),
    "--clip_p": _Option(_UNIT),
    # Features: interactions up to cubic, namespaces, hashing, the weight table.
    "--quadratic": _Option(_namespaces(2, 2), repeat=True),
    "--cubic": _Option(_namespaces(3, 3), repeat=True),
    "--interactions": _Option(_namespaces(2, 3), repeat=True),
    "--permutations": _FLAG,
    "--leave_duplicate_interactions": _FLAG,
    "--ignore": _LIST,
    "--ignore_linear": _LIST,
    "--keep": _LIST,
    "--noconstant": _FLAG,
    "--constant": _Option(_BOUND),
    "--hash": _Option(_choice("strings", "all")),
    "--hash_seed": _Option(_SEED),
    "--bit_precision": _Option(_BITS),
    # Learning rate and its schedule, regularisation, update rule and optimiser.
    "--learning_rate": _Option(_RATE),
    "--power_t": _Option(_UNIT),
    "--initial_t": _Option(_number(0, 1e9)),
    "--decay_learning_rate": _Option(_UNIT),
    "--l1": _Option(_RATE),
    "--l2": _Option(_RATE),
    "--sgd": _FLAG,
    "--adaptive": _FLAG,
    "--normalized": _FLAG,
    "--invariant": _FLAG,
    "--adax": _FLAG,
    "--coin": _FLAG,
    "--ftrl": _FLAG,
    "--pistol": _FLAG,
    "--ftrl_alpha": _Option(_RATE),
    "--ftrl_beta": _Option(_RATE),
    "--initial_weight": _Option(_BOUND),
    "--random_weights": _FLAG,
    "--normal_weights": _FLAG,
    "--truncated_normal_weights": _FLAG,
    "--sparse_weights": _FLAG,
    "--random_seed": _Option(_SEED),
    # Loss.
    "--loss_function": _Option(
        _choice("squared", "classic", "hinge", "logistic", "quantile", "poisson", "expectile")
    ),
    "--quantile_tau": _Option(_UNIT),
    "--expectile_q": _Option(_number(0, 0.5)),
    "--logistic_min": _Option(_BOUND),
    "--logistic_max": _Option(_BOUND),
    "--min_prediction": _Option(_BOUND),
    "--max_prediction": _Option(_BOUND),
}
_SHORT = {"-b": "--bit_precision", "-l": "--learning_rate", "-q": "--quadratic", "-C": "--constant"}
# Exploration algorithms by family (RegCB's two variants are one); VW stacks no two of them.
_ALGORITHMS = {
    "--squarecb": "--squarecb",
    "--regcb": "--regcb",
    "--regcbopt": "--regcb",
    "--bag": "--bag",
    "--cover": "--cover",
    "--first": "--first",
    "--softmax": "--softmax",
    "--rnd": "--rnd",
    "--synthcover": "--synthcover",
}
_INTERACTIONS = {"--quadratic", "--cubic", "--interactions"}
_LOOP_ALGORITHMS = {"--cb_adf", "--cb_explore_adf", "--ccb_explore_adf"}


def tokens(args: str) -> list[str]:
    try:
        return shlex.split(args)
    except ValueError as exc:
        raise PolicyError(f"cannot split arguments: {exc}") from None


def algorithm(kind: str) -> str:
    """The VW reduction a loop kind trains: a bandit explores in VW, an RL loop's Q model is a
    plain `--cb_adf` regressor that dloop explores around (learners.rl)."""
    return {"rl": "--cb_adf", "ccb": "--ccb_explore_adf"}.get(kind, "--cb_explore_adf")


def check_names(args: str, *, allowed: frozenset[str] = frozenset()) -> None:
    """Raise PolicyError if `args` (a model header's options) names a forbidden option in any
    spelling VW accepts (`--name value`, `--name=value`, `-xvalue`). Both shell-style and plain
    whitespace splitting are checked, so a quoting trick that hides an option from one splitter
    cannot get it past VW's own."""
    for part in (*tokens(args), *args.split()):
        if not part.startswith("-"):
            continue
        name = part.split("=", 1)[0] if part.startswith("--") else part[:2]
        if name in _FORBIDDEN and name not in allowed:
            raise PolicyError(f"option {name} is not allowed in a model")


def _is_option(word: str) -> bool:
    return word.startswith("-") and not _NEGATIVE.match(word)


def policy_options(args: str) -> list[tuple[str, str | None]]:
    """The options of policy arguments in order, as (long name, value or None for a flag), with
    every spelling VW reads (`--opt value`, `--opt=value`, `-x value`, `-xVALUE`) normalised.

    Raises PolicyError for anything but allowed options with valid values: an option off the
    list, a word that is no option's value (VW would read it as a data file), characters VW and
    shlex would split differently. Reads no file and builds no workspace.
    """
    if len(args) > 1024:
        raise PolicyError("policy arguments are limited to 1024 characters")
    if not _CHARACTERS.fullmatch(args):
        raise PolicyError(
            "policy arguments may hold only letters, digits, spaces and _@%+,.:=/- (Vowpal Wabbit "
            "splits them at spaces and would read quotes, backslashes and tabs literally)"
        )
    words = [word for word in args.split(" ") if word]
    options: list[tuple[str, str | None]] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word.startswith("--"):
            spelled, eq, rest = word.partition("=")
            attached = rest if eq else None
        elif _is_option(word) and len(word) > 1:
            spelled, attached = word[:2], word[2:] or None
        else:
            raise PolicyError(
                f"unexpected argument {word!r}: a policy holds options only (Vowpal Wabbit would "
                "read a word on its own as a data file); give every value its own option"
            )
        name = _SHORT.get(spelled, spelled)
        option = _OPTIONS.get(name)
        if option is None:
            raise PolicyError(
                f"option {spelled} is not allowed in a policy: a policy holds Vowpal Wabbit "
                "learning options only"
            )
        if option.value is None:
            if attached is not None:
                raise PolicyError(f"option {spelled} takes no value")
            options.append((name, None))
            continue
        value = attached
        # The next word is the value unless it is an option (a negative number is a value).
        if value is None and i < len(words) and not _is_option(words[i]):
            value = words[i]
            i += 1
        if not value:
            raise PolicyError(f"option {spelled} needs a value")
        if not option.value.valid(value):
            raise PolicyError(f"{spelled} {value}: must be {option.value.describe}")
        options.append((name, value))
    return options


def check_arguments(args: str, *, algorithm: str = "--cb_explore_adf") -> None:
    """Raise PolicyError unless `args` is a VW command line dloop may train and serve, as far as
    can be told without VW: allowed learning options only (policy_options), the loop's own
    reduction, within the caps. learners.vw.check_policy then lets VW itself refuse bad
    combinations."""
    names = [name for name, _ in policy_options(args)]
    if algorithm not in names:
        raise PolicyError(f"policy arguments must contain {algorithm}")
    others = sorted((_LOOP_ALGORITHMS - {algorithm}) & set(names))
    if others:
        raise PolicyError(f"this loop's policy must use {algorithm}, not {' '.join(others)}")
    if CROSS in names and algorithm != "--cb_adf":
        raise PolicyError(f"{CROSS} is for RL loops only")
    for name in dict.fromkeys(names):
        if names.count(name) > 1 and not _OPTIONS[name].repeat:
            raise PolicyError(f"option {name} is given more than once")
    if sum(name in _INTERACTIONS for name in names) > MAX_INTERACTIONS:
        raise PolicyError(f"a policy may hold at most {MAX_INTERACTIONS} interactions")
    families = list(dict.fromkeys(_ALGORITHMS[n] for n in names if n in _ALGORITHMS))
    if len(families) > 1:
        raise PolicyError(f"choose one exploration algorithm, not {' and '.join(families)}")
    if algorithm == "--cb_adf":
        exploring = next((name for name in names if _OPTIONS[name].explore), None)
        if exploring is not None:
            raise PolicyError(
                f"option {exploring} is for exploration, and an RL loop explores outside "
                "Vowpal Wabbit (explorationPercentage)"
            )


def without_cross(args: str) -> str:
    """The arguments with dloop's CROSS removed (what VW may see before it is resolved)."""
    return " ".join(word for word in args.split(" ") if word and word != CROSS)


def with_exploration(args: str, exploration: float) -> str:
    """Apply explorationPercentage to a policy, as Personalizer rewrites `--epsilon`.

    SquareCB has no epsilon of its own: its exploration is set by `--gamma_scale`, larger meaning
    greedier. dloop maps epsilon to gamma_scale = 2 / epsilon, so Personalizer's default 0.2 gives
    VW's default gamma_scale of 10 and epsilon 0 gives a greedy policy. Every other algorithm gets
    `--epsilon`.
    """
    parts = tokens(args)
    if "--squarecb" in parts:
        # Greedy enough past 1e6 (VW refuses gamma_scales near the float range).
        name, value = "--gamma_scale", min(2.0 / exploration if exploration > 0 else 1e6, 1e6)
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
