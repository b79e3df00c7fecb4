"""Model export and import: the archive format, its signature, size caps and model checks."""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mmh3
import orjson
import pytest
from fastapi.testclient import TestClient

from learners import policy, vw
from learners.cb import CBTrainer
from service.app import create_app
from tests.conftest import AUTH, FakeClock, Harness, make_settings

OCTETS = {**AUTH, "Content-Type": "application/octet-stream"}
ACTIONS = [{"id": a, "features": [{"topic": a}]} for a in ("news", "sports", "tech")]


def train(harness: Harness, path: str = "/personalizer/v1.0") -> None:
    harness.configure(modelExportFrequency="PT1S")
    for i in range(30):
        body = {"contextFeatures": [{"t": str(i % 3)}], "actions": ACTIONS, "eventId": f"t{i}"}
        assert harness.client.post(f"{path}/rank", json=body, headers=AUTH).status_code == 201
        harness.reward(f"t{i}", 1.0)
    harness.clock.advance(2)
    harness.work()


def export(harness: Harness, *, signed: bool, loop: str = "") -> bytes:
    r = harness.client.get(f"{loop}/personalizer/v1.0/model?signed={signed}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.content


def put(harness: Harness, body: bytes, loop: str = "") -> tuple[int, str]:
    r = harness.client.put(f"{loop}/personalizer/v1.0/model", content=body, headers=OCTETS)
    return r.status_code, (r.json()["error"]["code"] if r.content else "")


def archive(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def unpack(signed: bytes) -> tuple[bytes, dict[str, Any]]:
    with zipfile.ZipFile(io.BytesIO(signed)) as z:
        return z.read("model.vw"), orjson.loads(z.read("manifest.json"))


# --- zip bombs and archives that are not dloop's ------------------------------------------


@functools.cache
def zip_bomb(megabytes: int, *, lie: bool) -> bytes:
    """A few hundred KB that inflate to `megabytes` of zeros as model.vw. With `lie`, the
    archive's headers declare 1,000 bytes instead (the CRC then cannot match either)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("model.vw", "w") as f:  # streamed: the test never holds the inflated bytes
            chunk = bytes(1 << 20)
            for _ in range(megabytes):
                f.write(chunk)
        z.writestr("manifest.json", b"{}")
    data = bytearray(buf.getvalue())
    if lie:
        local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
        struct.pack_into("<I", data, local + 22, 1000)
        struct.pack_into("<I", data, central + 24, 1000)
    return bytes(data)


@pytest.mark.parametrize("lie", [False, True], ids=["declared", "lying-header"])
def test_a_zip_bomb_is_refused_without_inflating_it(harness: Harness, lie: bool) -> None:
    bomb = zip_bomb(300, lie=lie)
    assert len(bomb) < 400_000
    tracemalloc.start()
    try:
        status, code = put(harness, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (status, code) == (400, "InvalidModelImportFormat")
    assert peak < 32 << 20, f"peak {peak >> 20} MiB while refusing a 300 MiB bomb"


def manifest(**fields: Any) -> bytes:
    return orjson.dumps(fields)


@pytest.mark.parametrize(
    "entries,method",
    [
        ({"model.vw": b"x", "manifest.json": b"[]"}, zipfile.ZIP_DEFLATED),
        ({"model.vw": b"x", "manifest.json": b'"a string"'}, zipfile.ZIP_DEFLATED),
        ({"model.vw": b"x", "manifest.json": b"null"}, zipfile.ZIP_DEFLATED),
        ({"model.vw": b"x", "manifest.json": b"{not json"}, zipfile.ZIP_DEFLATED),
        ({"model.vw": b"x", "manifest.json": manifest(loop=1)}, zipfile.ZIP_DEFLATED),
        ({"model.vw": b"x", "manifest.json": b"{}"}, zipfile.ZIP_BZIP2),
        ({"model.vw": b"x", "manifest.json": b"{}"}, zipfile.ZIP_LZMA),
        ({"model.vw": b"x"}, zipfile.ZIP_STORED),
        ({"model.vw": b"x", "manifest.json": b"{}", "extra": b""}, zipfile.ZIP_STORED),
        ({"../model.vw": b"x", "manifest.json": b"{}"}, zipfile.ZIP_STORED),
    ],
    ids=[
        "manifest-list",
        "manifest-string",
        "manifest-null",
        "manifest-not-json",
        "manifest-wrong-types",
        "bzip2",
        "lzma",
        "no-manifest",
        "extra-entry",
        "other-name",
    ],
)
def test_archives_that_are_not_dloops_are_400(
    harness: Harness, entries: dict[str, bytes], method: int
) -> None:
    assert put(harness, archive(entries, method)) == (400, "InvalidModelImportFormat")


def test_a_truncated_or_commented_archive_is_400(harness: Harness) -> None:
    signed = export(harness, signed=True)
    assert put(harness, signed[:-30]) == (400, "InvalidModelImportFormat")
    assert put(harness, signed[:100]) == (400, "InvalidModelImportFormat")
    with_comment = bytearray(signed)
    struct.pack_into("<H", with_comment, len(signed) - 2, 4)
    assert put(harness, bytes(with_comment) + b"note") == (400, "InvalidModelImportFormat")


# --- the signature ----------------------------------------------------------------------------


def test_signed_export_round_trips(harness: Harness) -> None:
    train(harness)
    signed = export(harness, signed=True)
    model, meta = unpack(signed)
    assert set(meta) == {"loop", "kind", "modelId", "arguments", "sha256", "signature"}
    assert meta["sha256"] == hashlib.sha256(model).hexdigest()
    assert harness.client.delete("/personalizer/v1.0/model", headers=AUTH).status_code == 204
    assert put(harness, signed) == (204, "")
    assert export(harness, signed=False) == model


def test_a_signed_archive_with_a_changed_model_or_manifest_is_refused(harness: Harness) -> None:
    """The digest alone is a checksum anyone can recompute; the signature is an HMAC keyed by a
    secret only the deployment has."""
    train(harness)
    model, meta = unpack(export(harness, signed=True))
    other = CBTrainer("--cb_explore_adf --squarecb -q ::").to_bytes()
    forged = {**meta, "sha256": hashlib.sha256(other).hexdigest()}
    body = archive({"model.vw": other, "manifest.json": orjson.dumps(forged)})
    assert put(harness, body) == (400, "InvalidModelImportSignature")
    edited = {**meta, "modelId": "mine"}
    body = archive({"model.vw": model, "manifest.json": orjson.dumps(edited)})
    assert put(harness, body) == (400, "InvalidModelImportSignature")
    flipped = bytearray(model)
    flipped[-3] ^= 0x10  # a weight: VW itself would load it
    body = archive({"model.vw": bytes(flipped), "manifest.json": orjson.dumps(meta)})
    assert put(harness, body) == (400, "InvalidModelImportSignature")


def test_a_signed_archive_imports_only_into_its_loop_and_policy(harness: Harness) -> None:
    train(harness)
    signed = export(harness, signed=True)
    assert harness.client.put("/loops/shop", json={"kind": "cb"}, headers=AUTH).status_code == 201
    assert put(harness, signed, loop="/loops/shop") == (400, "InvalidModelMetadata")
    model, _ = unpack(signed)
    assert put(harness, model, loop="/loops/shop") == (204, "")  # raw bytes: an explicit choice

    policy = {"name": "p", "arguments": "--cb_explore_adf --epsilon 0.1 -q ::"}
    url = "/personalizer/v1.0/configurations/policy"
    assert harness.client.put(url, json=policy, headers=AUTH).status_code == 200
    assert put(harness, signed) == (400, "InvalidModelMetadata")


def test_the_signing_key_is_made_once_and_shared(harness: Harness, tmp_path: Path) -> None:
    """A second process on the same database (another replica) verifies what the first signed."""
    signed = export(harness, signed=True)
    settings = harness.dloop.settings
    with TestClient(create_app(settings, clock=FakeClock(), run_worker=False)) as other:
        r = other.put("/personalizer/v1.0/model", content=signed, headers=OCTETS)
        assert r.status_code == 204, r.text


# --- raw models ---------------------------------------------------------------------------------


@pytest.fixture
def small_cap(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path / "data", max_model_bytes=1 << 20)
    with TestClient(create_app(settings, clock=FakeClock(), run_worker=False)) as client:
        yield client


def test_a_model_over_the_cap_is_413(small_cap: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the route counts as it reads
        for _ in range(64):
            yield bytes(64 << 10)

    for body in (bytes(2 << 20), chunks()):
        r = small_cap.put("/personalizer/v1.0/model", content=body, headers=OCTETS)
        assert r.status_code == 413 and r.json()["error"]["code"] == "PayloadSizeExceeded"
    r = small_cap.put("/personalizer/v1.0/model", content=zip_bomb(2, lie=False), headers=OCTETS)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidModelImportFormat"


def test_truncated_or_padded_raw_models_are_400(harness: Harness) -> None:
    train(harness)
    model = export(harness, signed=False)
    assert put(harness, model) == (204, "")
    for bad in (model[:-5], model[: len(model) // 2 + 3], model + b"\0\0\0", model + b"x" * 16):
        assert put(harness, bad) == (400, "InvalidModelImportFormat")


# --- check_model, without the service ------------------------------------------------------------

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


def test_replicas_racing_for_the_signing_key_agree_on_one(postgres_url: str) -> None:
    """Two processes asking for the key of a new deployment at once: the second insert waits
    for the first transaction and then reads its key back."""
    import threading
    import time

    from sqlalchemy import text

    from service.storage import store
    from service.storage.db import make_engine, make_sessionmaker
    from service.storage.migrate import upgrade

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    try:
        first = sessions()
        first.begin()
        key = store.server_secret(first, name="model-signing", now=1.0)  # not committed yet
        found: list[bytes] = []

        def second() -> None:
            with sessions.begin() as session:
                found.append(store.server_secret(session, name="model-signing", now=2.0))

        t = threading.Thread(target=second)
        t.start()
        deadline = time.monotonic() + 10
        with engine.connect() as conn:  # wait until the second insert waits on the first
            waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
            while conn.execute(text(waiting)).scalar_one() == 0:
                assert time.monotonic() < deadline, "the second insert never waited"
                conn.rollback()
        first.commit()
        first.close()
        t.join(10)
        assert found == [key] and len(key) == 32
    finally:
        engine.dispose()
