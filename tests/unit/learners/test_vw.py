"""VW glue (learners.vw): a model is checked before it is served (its kind, its bytes to the
last one, header options that would make VW write files), and a skipped multi-slot line is never
handed to VW."""

from __future__ import annotations

import struct
from pathlib import Path

import mmh3
import orjson
import pytest

from learners import policy, vw
from learners.cb import CBTrainer
from learners.ccb import ccb_context
from learners.features import actions_json, context_json, with_json

ACTIONS = [{"id": f"a{i}", "features": [{"kind": {"k": f"k{i}"}}]} for i in range(4)]


POLICIES = [
    ("cb", "--cb_explore_adf --squarecb -q ::"),
    ("cb", "--cb_explore_adf --epsilon 0.2 --power_t 0 -l 0.001 --cb_type mtr -q ::"),
    ("cb", "--cb_explore_adf --squarecb -q :: --sparse_weights"),
    ("ccb", "--ccb_explore_adf --squarecb -q ::"),
    ("rl", "--cb_adf -q ::"),
]


def trained_bytes(args: str, *, predict_only: bool = False) -> bytes:
    line = orjson.dumps(
        {
            "_label_cost": -1.0,
            "_label_probability": 0.5,
            "_label_Action": 1,
            "_labelIndex": 0,
            "a": [1, 2],
            "p": [0.5, 0.5],
            "c": {"u": {"f": "x"}, "_multi": [{"a": {"id": "1"}}, {"a": {"id": "2"}}]},
        }
    ).decode()
    if args.startswith("--ccb"):
        line = orjson.dumps(
            {
                "c": {
                    "u": {"f": "x"},
                    "_multi": [{"a": {"id": "1"}}, {"a": {"id": "2"}}],
                    "_slots": [{"_id": "s"}],
                },
                "_outcomes": [{"_label_cost": -1.0, "_a": [0, 1], "_p": [0.5, 0.5]}],
            }
        ).decode()
    trainer = CBTrainer(args)
    for _ in range(20):
        trainer.learn_text(line)
    model = trainer.to_bytes()
    if predict_only:
        ws = vw.workspace("--predict_only_model", model)
        model = vw.model_bytes(ws)
        ws.finish()
    return model


@pytest.mark.parametrize("kind,args", POLICIES)
@pytest.mark.parametrize("predict_only", [False, True], ids=["resumable", "predict-only"])
def test_check_model_refuses_truncated_or_padded_models(
    kind: str, args: str, predict_only: bool
) -> None:
    model = trained_bytes(args, predict_only=predict_only)
    vw.check_model(model, kind=kind)
    vw.check_model(CBTrainer(args).to_bytes(), kind=kind)
    for cut in (1, 3, 7):
        with pytest.raises(policy.PolicyError):
            vw.check_model(model[:-cut], kind=kind)
    for pad in (b"\0", b"\0" * 5, b"junk" * 4):
        with pytest.raises(policy.PolicyError):
            vw.check_model(model + pad, kind=kind)


def rebuild(model: bytes, *, options: str | None = None, model_id: str | None = None) -> bytes:
    """`model` with its header's option string or id replaced and the header checksum redone:
    what anyone can write, since VW's checksum (MurmurHash3 chained over the header's fields,
    from the id on) is no secret. Assumes no --ngram or --skips."""
    u32 = struct.Struct("<I")
    pos = 4 + u32.unpack_from(model, 0)[0]
    id_end = pos + 4 + u32.unpack_from(model, pos)[0]
    old_id = model[pos + 4 : id_end]
    fixed = model[id_end : id_end + 1 + 24]  # 'm', min, max, bits, lda, 0 ngrams, 0 skips
    pos = id_end + 25
    opts_end = pos + 4 + u32.unpack_from(model, pos)[0]
    old_opts = model[pos + 4 : opts_end]
    rest = model[opts_end + 8 :]  # after the checksum's length and value
    new_id = old_id if model_id is None else model_id.encode() + b"\0"
    new_opts = old_opts if options is None else options.encode() + b"\0"
    fields = [u32.pack(len(new_id)), new_id, fixed[:1]]
    fields += [fixed[i : i + 4] for i in range(1, 25, 4)]
    fields += [u32.pack(len(new_opts)), new_opts]
    digest = 0
    for field in fields:
        digest = mmh3.hash(field, digest, signed=False)
    header = model[: 4 + u32.unpack_from(model, 0)[0]] + b"".join(fields)
    return header + u32.pack(4) + u32.pack(digest) + rest


def test_model_header_options_cannot_make_vw_write_files(tmp_path: Path) -> None:
    model = trained_bytes("--cb_explore_adf --squarecb -q ::")
    assert rebuild(model) == model  # the helper rebuilds a real header exactly
    target = tmp_path / "written"
    options = " --cb_adf --cb_explore_adf --cb_type mtr --csoaa_ldf multiline --squarecb"
    crafted = [
        rebuild(model, options=f"{options} --readable_model {target}"),
        rebuild(model, options=f"{options} --invert_hash={target}"),
        rebuild(model, options=f"{options} --dump_json_weights_experimental {target}"),
        rebuild(model, model_id=f"x --readable_model {target}"),
        rebuild(model, options=f'{options} --quadratic ":: --readable_model {target}"'),
    ]
    for bad in crafted:
        with pytest.raises(policy.PolicyError):
            vw.check_model(bad, kind="cb")
    assert not target.exists()


def test_a_skipped_multi_slot_line_is_not_handed_to_vw() -> None:
    """VW 9.11.9 segfaults learning a `_skipLearn` CCB line; learners must drop it first."""
    from learners.cb import CBTrainer
    from learners.ccb import ccb_line

    c = ccb_context(
        [{"user": {"u": "u0"}}],
        [(a["id"], a["features"]) for a in ACTIONS[:2]],
        [("hero", [], [0, 1])],
    )
    trainer = CBTrainer("--ccb_explore_adf --squarecb -q ::")
    for skip in (False, True):
        line = ccb_line(
            event_id="e",
            timestamp="2026-11-24T10:00:00.000000Z",
            c=c,
            outcomes=[{"id": "hero", "a": [1, 0], "p": [0.5, 0.5], "cost": -1.0, "original": -1.0}],
            baselines=[0],
            model_id="m",
            skip_learn=skip,
        )
        trainer.learn(line)
    assert trainer.examples == 1


def test_model_import_checks_the_models_kind() -> None:
    from learners import policy, vw
    from learners.policy import PolicyError

    models = {
        kind: vw.model_bytes(vw.workspace(policy.algorithm(kind))) for kind in ("cb", "ccb", "rl")
    }
    for kind, model in models.items():
        vw.check_model(model, kind=kind)
        for other in set(models) - {kind}:
            with pytest.raises(PolicyError, match=policy.algorithm(other)):
                vw.check_model(model, kind=other)


def test_weights_beyond_twenty_bits_are_sparse_wherever_a_model_is_loaded(tmp_path: Path) -> None:
    """VW does not keep `--sparse_weights` in a saved model: without it every process loading a
    `-b 22` model (the default RL policy's) would hold an array of 2^22 weights of 4 floats
    (64 MB); every workspace made through learners.vw adds it by the model's bits."""
    small, large = vw.workspace("--cb_adf"), vw.workspace("--cb_adf -b 22")
    assert "--sparse_weights" not in small.get_arguments()
    assert "--sparse_weights" in large.get_arguments()
    for ws, sparse in ((small, False), (large, True)):
        model = vw.model_bytes(ws)
        path = tmp_path / "model.vw"
        path.write_bytes(model)
        for loaded in (vw.workspace("--json", model), vw.workspace_file("--json", str(path))):
            assert ("--sparse_weights" in loaded.get_arguments()) is sparse
            loaded.finish()
        ws.finish()
    vw.check_policy("--cb_explore_adf -b 22")  # checked sparse too
    # Every spelling VW reads (learners.policy.policy_options) counts.
    for spelled in ("-b22", "--bit_precision 22", "--bit_precision=22"):
        ws = vw.workspace(f"--cb_adf {spelled}")
        assert "--sparse_weights" in ws.get_arguments(), spelled
        ws.finish()


# Every exploration algorithm a policy may hold, with interactions, on the cb loops' reduction,
# and an RL loop's.
SCORED = [
    "--cb_explore_adf --epsilon 0.2 -q ::",
    "--cb_explore_adf --squarecb -q :: --cubic :::",
    "--cb_explore_adf --bag 3",
    "--cb_explore_adf --cover 3",
    "--cb_explore_adf --softmax --lambda 5",
    "--cb_explore_adf --regcb",
    "--cb_explore_adf --rnd 2",
    "--cb_explore_adf --synthcover",
    "--cb_explore_adf --first 2",
    "--cb_explore_adf --elim",
    "--cb_explore_adf --cb_type dr --normalized --adaptive --ignore_linear F",
    "--cb_adf -q :: --sparse_weights -b 22",
]


@pytest.mark.parametrize("args", SCORED)
def test_a_scorer_s_kept_action_examples_score_as_a_whole_parse_does(args: str) -> None:
    """vw.Scorer parses the context alone and predicts it with the action examples it kept: the
    same scores, bit for bit, as parsing the whole example, on every ranked list, however
    often (a prediction leaves the kept examples as it found them), with or without context."""
    import random

    rng = random.Random(7)

    def context() -> list[dict[str, object]]:
        if rng.random() < 0.15:
            return []
        return [{"u": {"c": rng.choice("abc"), "n": rng.randint(0, 9)}, "t": rng.choice("xy")}]

    def actions() -> list[tuple[str, object]]:
        return [
            (f"a{i}", [{"k": f"k{i % 3}", "len": i + 1}])
            for i in rng.sample(range(12), rng.randint(1, 6))
        ]

    trainer = CBTrainer(f"{args} --random_seed 3")
    for _ in range(200):
        c, a = context(), actions()
        chosen = rng.randrange(len(a))
        line = {
            "_label_cost": -rng.random(),
            "_label_probability": 0.5,
            "_label_Action": chosen + 1,
            "_labelIndex": chosen,
            "a": [chosen + 1],
            "p": [0.5] * len(a),
            "c": orjson.loads(context_json(c, a)),
        }
        trainer.learn_text(orjson.dumps(line).decode())
    model = trainer.to_bytes()
    trainer.close()
    whole = vw.workspace("--json", model)
    kept = vw.KeptActions(examples=8)  # gives back: 5 lists of 1 to 6 actions below
    scorer = vw.Scorer(vw.workspace("--json", model), kept)
    lists = [actions_json(actions()) for _ in range(5)]
    for _ in range(400):
        features, multi = orjson.dumps(context()), rng.choice(lists)
        expected = vw.predict_scores(whole, with_json(features, multi).decode())
        assert scorer.scores(features, multi) == expected
    assert 0 < kept.count <= 8
    scorer.finish()
    assert kept.count == 0
    whole.finish()


def test_a_scorer_refuses_what_vw_cannot_parse_and_keeps_nothing_of_it() -> None:
    scorer = vw.Scorer(vw.workspace("--json", trained_bytes("--cb_explore_adf --epsilon 0.2")))
    good = actions_json([("a", [{"k": "x"}]), ("b", [{"k": "y"}])])
    bad = b'[{"k":["a","b"]}]'  # a string array: VW's JSON parser raises
    for _ in range(3):  # parsed whole, then apart: refused either way, never kept
        with pytest.raises(RuntimeError):
            scorer.scores(b'[{"u":{"f":"x"}}]', bad)
        with pytest.raises(RuntimeError):
            scorer.scores(b'[{"u":["a","b"]}]', good)
    assert scorer.kept.count == 0
    assert len(scorer.scores(b'[{"u":{"f":"x"}}]', good)) == 2
    assert scorer.kept.count == 2 and scorer.kept.get(scorer, good) is not None
    with pytest.raises(RuntimeError):  # a bad context beside kept actions
        scorer.scores(b'[{"u":["a","b"]}]', good)
    assert scorer.kept.count == 2
    scorer.finish()


def test_the_kept_action_examples_stay_within_one_budget_across_models() -> None:
    """A kept example costs about 20 KB: the scorers of one thread or process share a budget
    of examples, the least recently used list given back first; a list is kept from its
    second rank on (a list ranked once is parsed whole: apart costs more); a list bigger than
    the budget is scored without being kept; a finished scorer gives back all it kept."""
    model = trained_bytes("--cb_explore_adf --epsilon 0.2")
    kept = vw.KeptActions(examples=10)
    first = vw.Scorer(vw.workspace("--json", model), kept)
    second = vw.Scorer(vw.workspace("--json", model), kept)
    features = b'[{"u":{"f":"x"}}]'

    def actions(n: int, tag: str) -> bytes:
        return actions_json([(f"{tag}{i}", [{"k": f"k{i}"}]) for i in range(n)])

    small, other = actions(4, "a"), actions(4, "b")
    first.scores(features, small)
    assert kept.count == 0  # ranked once: parsed whole
    first.scores(features, small)
    second.scores(features, other)
    second.scores(features, other)
    assert kept.count == 8
    first.scores(features, small)  # used again: the most recent
    third = actions(3, "c")
    second.scores(features, third)
    second.scores(features, third)  # over budget: `other` is given back
    assert kept.count == 7
    assert kept.get(first, small) is not None and kept.get(second, other) is None
    big = actions(11, "d")
    for _ in range(3):
        assert len(first.scores(features, big)) == 11  # scored, never kept
    assert kept.count == 7
    first.finish()
    assert kept.count == 3
    second.finish()
    assert kept.count == 0
