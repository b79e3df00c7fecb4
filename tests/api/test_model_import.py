"""Model export and import (service.api.routes.model): the archive format, its signature, size
caps and model checks, and export, reset and import through the API."""

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

import orjson
import pytest
from fastapi.testclient import TestClient

from learners.cb import CBTrainer
from service.app import create_app
from tests.support.bodies import rank_body
from tests.support.harness import AUTH, FakeClock, Harness, make_settings

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


# --- export, reset and import through every path style ----------------------------------------


def test_model_export_import_reset(harness: Harness) -> None:
    harness.configure(modelExportFrequency="PT1S")
    for i in range(30):
        harness.rank(rank_body(f"t{i}"))
        harness.reward(f"t{i}", 1.0)
    harness.clock.advance(2)
    harness.work()
    raw = harness.client.get("/personalizer/v1.0/model", headers=AUTH)
    signed = harness.client.get("/personalizer/model?signed=true&api-version=x", headers=AUTH)
    assert raw.status_code == 200 and len(raw.content) > 100
    assert signed.content.startswith(b"PK")
    props = harness.client.get("/personalizer/v1.0/model/properties", headers=AUTH).json()
    assert set(props) == {"creationTime", "lastModifiedTime"}

    assert harness.client.delete("/personalizer/v1.0/model", headers=AUTH).status_code == 204
    assert harness.dloop.registry.loops["default"].model_id == "N/A"
    out = harness.rank(rank_body("after-reset"))
    assert [a["probability"] for a in out["ranking"]] == pytest.approx([1 / 3] * 3)

    headers = {**AUTH, "Content-Type": "application/octet-stream"}
    r = harness.client.put(
        "/personalizer/v1.1-preview.3/model", content=signed.content, headers=headers
    )
    assert r.status_code == 204, r.text
    assert harness.dloop.registry.loops["default"].model_id != "N/A"
    r = harness.client.put("/personalizer/model", content=raw.content, headers=headers)
    assert r.status_code == 204

    r = harness.client.put("/personalizer/model", content=b"garbage", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidModelImportFormat"
    tampered = signed.content.replace(b"model.vw", b"model.vx", 1)
    r = harness.client.put("/personalizer/model", content=tampered, headers=headers)
    assert r.status_code == 400
