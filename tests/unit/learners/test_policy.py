"""Policy arguments (learners.policy, learners.vw.check_policy): an allowlist of VW learning
options, checked without touching any file, and the exploration setting written into them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from learners import cb, ccb, policy, rl, vw
from learners.policy import PolicyError, algorithm, policy_options, with_exploration
from learners.vw import check_policy
from service.pipeline.evaluations import SEARCH
from tests.support.files import assert_untouched

README = Path(__file__).resolve().parents[3] / "README.md"

# Every way a file could reach VW: options that name one (value attached, after `=` or as the
# next word), positional words (VW reads them as data files), and quoting that shlex reads as one
# word where VW, which splits on spaces only, reads several.
BYPASSES = [
    "--cb_explore_adf -f{path}",
    "--cb_explore_adf -f {path}",
    "--cb_explore_adf -p{path}",
    "--cb_explore_adf -p {path}",
    "--cb_explore_adf -r{path}",
    "--cb_explore_adf --final_regressor={path}",
    "--cb_explore_adf --final_regressor {path}",
    "--cb_explore_adf --predictions={path}",
    "--cb_explore_adf --readable_model={path}",
    "--cb_explore_adf --invert_hash={path}",
    "--cb_explore_adf --cache_file={path}",
    "--cb_explore_adf -i{path}",
    "--cb_explore_adf --feature_mask={path}",
    "--cb_explore_adf {path}",
    "{path} --cb_explore_adf",
    "--cb_explore_adf --squarecb {path}",
    "--cb_explore_adf -q :: {path}",
    "--cb_explore_adf --epsilon 0.1 {path}",
    "--cb_explore_adf -d {path}",
    "--cb_explore_adf -d{path}",
    "--cb_explore_adf --data {path}",
    "--cb_explore_adf --data={path}",
    "--cb_explore_adf --ignore 'a -f {path}'",
    '--cb_explore_adf --ignore "a -f {path}"',
    "--cb_explore_adf --ignore a\\ -f\\ {path}",
]


@pytest.mark.parametrize("template", BYPASSES)
def test_no_policy_touches_a_file_or_tells_whether_one_exists(
    files: tuple[Path, Path], template: str
) -> None:
    existing, fresh = files
    messages = []
    for path in (existing, fresh):
        with pytest.raises(PolicyError) as caught:
            check_policy(template.format(path=path))
        messages.append(str(caught.value).replace(str(path), "PATH"))
    assert_untouched(existing, fresh)
    # The same answer whether or not the file exists.
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ("--cb_explore_adf --no_such_option", "--no_such_option"),
        ("--cb_explore_adf --no_such_option=3", "--no_such_option"),
        ("--cb_explore_adf -x3", "-x"),
        ("--cb_explore_adf --daemon", "--daemon"),
        ("--cb_explore_adf --sendto=localhost", "--sendto"),
        ("--cb_explore_adf --quiet", "--quiet"),
        ("--cb_explore_adf --eps 0.1", "--eps"),
        ("--cb_explore_adf -- -q ::", "--"),
    ],
)
def test_options_off_the_list_are_refused_by_name(args: str, named: str) -> None:
    with pytest.raises(PolicyError, match=f"option {re.escape(named)} "):
        check_policy(args)


@pytest.mark.parametrize(
    "args",
    [
        "--cb_explore_adf -b 40",
        "--cb_explore_adf -b40",
        "--cb_explore_adf --bit_precision=23",
        "--cb_explore_adf -b 0",
        "--cb_explore_adf -b=18",
        "--cb_explore_adf --bag 17",
        "--cb_explore_adf --cover 100",
        "--cb_explore_adf --rnd 40",
        "--cb_explore_adf --synthcover --synthcoversize 1000",
        "--cb_explore_adf " + "-q ab " * 17,
        "--cb_explore_adf --interactions abcd",
        "--cb_explore_adf --cubic ab",
        "--cb_explore_adf -q abc",
        "--cb_explore_adf -q=ab",
        "--cb_explore_adf -q a-",
        "--cb_explore_adf --epsilon 2",
        "--cb_explore_adf --epsilon nan",
        "--cb_explore_adf --epsilon 0x1p-3",
        "--cb_explore_adf --epsilon 1_0",
        "--cb_explore_adf --epsilon",
        "--cb_explore_adf --epsilon --squarecb",
        "--cb_explore_adf --epsilon=",
        "--cb_explore_adf --squarecb=1",
        "--cb_explore_adf --power_t inf",
        "--cb_explore_adf --cb_type bogus",
        "--cb_explore_adf --loss_function bogus",
        "--cb_explore_adf --epsilon 0.1 --epsilon 0.2",
        "--cb_explore_adf -b 18 --bit_precision 18",
        "--cb_explore_adf -q sa ub",
        "--cb_explore_adf\t-q ::",
        "--cb_explore_adf --epsilon 'unterminated",
        "--cb_explore_adf --squarecb --bag 3",
        "--cb_explore_adf --cb_adf",
        "--cb_adf -q ::",
        "",
        "--cb_explore_adf " + "-q :: " * 300,
    ],
)
def test_bad_values_caps_and_malformed_arguments_are_refused(args: str) -> None:
    with pytest.raises(PolicyError) as caught:
        check_policy(args)
    assert "\n" not in str(caught.value)


def test_an_rl_loop_explores_outside_vw() -> None:
    with pytest.raises(PolicyError, match="--squarecb"):
        check_policy("--cb_adf --squarecb -q ::", algorithm="--cb_adf")
    with pytest.raises(PolicyError, match="--epsilon"):
        check_policy("--cb_adf --epsilon 0.1", algorithm="--cb_adf")


@pytest.mark.parametrize(
    "args",
    [
        "--cb_explore_adf -b18 -l0.1 -qsa -C-0.5",
        "--cb_explore_adf -b 18 -l 0.1 -q sa -C -0.5",
        "--cb_explore_adf --bit_precision=22 --learning_rate=0.1 --quadratic=sa --constant=-0.5",
        "--cb_explore_adf -q:: --epsilon=0.1 --cb_type=ips --power_t=0",
        "--cb_explore_adf --interactions=::: --cubic abc -q ab -q :: --ignore_linear=s --keep ab",
        "--cb_explore_adf --squarecb --gamma_scale=5 --gamma_exponent 0.5 --elim --mellowness 0.01",
        "--cb_explore_adf --bag=16 --greedify --first_only --epsilon 0.05",
        "--cb_explore_adf --cover 16 --psi 0.1 --nounif --cb_type dr",
        "--cb_explore_adf --regcb --regcbopt --mellowness 0.1 --cb_min_cost -1 --cb_max_cost 0",
        "--cb_explore_adf --softmax --lambda 2",
        "--cb_explore_adf --first 5",
        "--cb_explore_adf --rnd 3 --rnd_alpha 0.1 --rnd_invlambda 0.5",
        "--cb_explore_adf --synthcover --synthcoversize 50 --synthcoverpsi 0.2",
        "--cb_explore_adf --coin -q ::",
        "--cb_explore_adf --ftrl --ftrl_alpha 0.1 --ftrl_beta 1",
        "--cb_explore_adf --sgd --l1 1e-6 --l2=1e-6 --initial_t 1 --decay_learning_rate 1",
        "--cb_explore_adf --adaptive --normalized --invariant --noconstant",
        "--cb_explore_adf --loss_function=quantile --quantile_tau 0.3",
        "--cb_explore_adf --hash all --hash_seed 3 --random_weights --random_seed 4",
        "--cb_explore_adf --permutations --leave_duplicate_interactions -q ::",
        "--cb_explore_adf  --clip_p 0.1  --min_prediction -1 --max_prediction 1 ",
    ],
)
def test_every_spelling_of_allowed_options_is_accepted(args: str) -> None:
    check_policy(args)


def test_options_are_normalised() -> None:
    assert policy_options("--cb_explore_adf -b18 --epsilon=0.1 -q :: -qsa -C -0.5 --sgd") == [
        ("--cb_explore_adf", None),
        ("--bit_precision", "18"),
        ("--epsilon", "0.1"),
        ("--quadratic", "::"),
        ("--quadratic", "sa"),
        ("--constant", "-0.5"),
        ("--sgd", None),
    ]


def readme_policies() -> list[str]:
    """Every VW command line the README quotes as a policy (`--cb...` or `--ccb...` in
    backticks, possibly wrapped over lines)."""
    quoted = re.findall(r"`(--c?cb_(?:explore_)?adf\b[^`]*)`", README.read_text())
    return [" ".join(q.split()) for q in quoted]


def named_policies() -> list[tuple[str, str]]:
    policies = [(p, "cb") for p in cb.NAMED_POLICIES.values()]
    policies += [(p, "ccb") for p in ccb.NAMED_CCB_POLICIES.values()]
    policies += [(p, "rl") for p in rl.NAMED_RL_POLICIES.values()]
    policies += [(args, "cb") for _, args in SEARCH]
    policies += [
        (args.replace("--cb_explore_adf", "--ccb_explore_adf"), "ccb") for _, args in SEARCH
    ]
    return policies


@pytest.mark.parametrize(("args", "kind"), named_policies())
def test_named_and_searched_policies_pass(args: str, kind: str) -> None:
    check_policy(args, algorithm=algorithm(kind))


def test_readme_policies_pass() -> None:
    quoted = readme_policies()
    assert len(quoted) >= 5
    for args in quoted:
        check_policy(args, algorithm=args.split()[0])


@pytest.mark.parametrize(
    ("args", "exploration", "expected"),
    [
        ("--cb_explore_adf --epsilon=0.1 -q::", 0.3, "--cb_explore_adf -q:: --epsilon 0.3"),
        ("--cb_explore_adf --epsilon 0.1 -b18", 0.0, "--cb_explore_adf -b18 --epsilon 0"),
        (
            "--cb_explore_adf --squarecb --gamma_scale=5 -qsa",
            0.2,
            "--cb_explore_adf --squarecb -qsa --gamma_scale 10",
        ),
        ("--cb_explore_adf --squarecb", 0.0, "--cb_explore_adf --squarecb --gamma_scale 1e+06"),
    ],
)
def test_exploration_rewrites_every_spelling(args: str, exploration: float, expected: str) -> None:
    assert with_exploration(args, exploration) == expected
    check_policy(expected)


def test_exploration_rewrites_epsilon() -> None:
    args = "--cb_explore_adf --epsilon 0.2 --power_t 0 -q ::"
    assert with_exploration(args, 0.05) == "--cb_explore_adf --power_t 0 -q :: --epsilon 0.05"


def test_exploration_sets_squarecb_gamma_scale() -> None:
    assert with_exploration("--cb_explore_adf --squarecb", 0.2).endswith("--gamma_scale 10")
    assert with_exploration("--cb_explore_adf --squarecb --gamma_scale=3", 0.5).endswith(
        "--squarecb --gamma_scale 4"
    )
    assert with_exploration("--cb_explore_adf --squarecb", 0.0).endswith("--gamma_scale 1e+06")


@pytest.mark.parametrize(
    "args",
    [
        "--cb_adf -q ::",
        "--cb_explore_adf -f /tmp/evil.model",
        "--cb_explore_adf --final_regressor=/tmp/x",
        "--cb_explore_adf --readable_model /tmp/x",
        "--cb_explore_adf --no_such_option",
        "--cb_explore_adf --epsilon 'unterminated",
        "--cb_explore_adf " + "-q :: " * 300,
    ],
)
def test_rejected_policies(args: str) -> None:
    with pytest.raises(PolicyError):
        check_policy(args)


def test_accepted_policies() -> None:
    check_policy("--cb_explore_adf --squarecb -q ::")
    check_policy("--cb_explore_adf --epsilon 0.2 --power_t 0 -l 0.001 --cb_type mtr -q ::")
    check_policy("--cb_explore_adf --bag 3 -q ::")


@pytest.mark.parametrize(
    "args",
    [
        "--cb_explore_adf -f/tmp/dloop-policy-test",
        "--cb_explore_adf -p/tmp/dloop-policy-test",
        "--cb_explore_adf --dump_json_weights_experimental /tmp/dloop-policy-test",
        "--cb_explore_adf --epsilon_decay_audit /tmp/dloop-policy-test",
    ],
)
def test_policies_cannot_name_files_in_any_spelling(args: str) -> None:
    with pytest.raises(policy.PolicyError):
        vw.check_policy(args)
    assert not Path("/tmp/dloop-policy-test").exists()
