"""Model export, import, reset and properties.

Export is the trainer's checkpoint (VW model bytes, resumable). With `signed=true` it is a zip
holding `model.vw` and `manifest.json`: the loop, its kind, the model id, the VW arguments, the
SHA-256 of the model (a checksum) and `signature`, an HMAC-SHA256 over the other manifest
fields and the model bytes keyed by a secret of this deployment (`server_secrets`, made on first
use, shared by every replica). Import takes the raw model bytes (Personalizer's form) or such an
archive; an archive must be signed by this deployment and come from the same loop and arguments.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import struct
import zipfile
import zlib
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from learners.dsjson import timestamp
from learners.policy import PolicyError
from learners.sandbox import blank_model, check_model
from service.api.deps import AdminLoop, State, ViewLoop, loop_for
from service.api.errors import ApiError, bad_request
from service.api.state import Dloop
from service.pipeline.runtime import LoopRuntime
from service.storage import store
from service.storage.models import Loop

router = APIRouter()

SIGNING_KEY = "model-signing"
MODEL, MANIFEST = "model.vw", "manifest.json"
FIELDS = ("loop", "kind", "modelId", "arguments", "sha256", "signature")
MAX_MANIFEST_BYTES = 64 << 10
# The end-of-central-directory record of an archive without a comment: its last 22 bytes.
_EOCD = struct.Struct("<4sHHHHIIH")


def _signing_key(d: Dloop) -> bytes:
    with d.sessions.begin() as session:
        return store.server_secret(session, name=SIGNING_KEY, now=d.clock())


def _signature(key: bytes, manifest: dict[str, Any], model: bytes) -> str:
    signed = {k: v for k, v in manifest.items() if k != "signature"}
    mac = hmac.new(key, orjson.dumps(signed, option=orjson.OPT_SORT_KEYS), hashlib.sha256)
    mac.update(model)
    return mac.hexdigest()


def _archive(model: bytes, manifest: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(MODEL, model)
        z.writestr(MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return buf.getvalue()


def _unpack(body: bytes, cap: int) -> tuple[bytes, dict[str, Any]]:
    """The model and manifest of a dloop archive, never inflating more than `cap` bytes.

    The entry count and directory size are checked before zipfile parses the directory (a
    directory of millions of entries would cost gigabytes of ZipInfo objects); declared sizes
    are checked before inflating, and reading stops at the declared size even if the header
    lies (zipfile then finds the CRC wrong)."""

    def refuse(why: str) -> ApiError:
        return bad_request("InvalidModelImportFormat", f"not a dloop model archive: {why}")

    if len(body) < _EOCD.size:
        raise refuse("too short")
    sig, _, _, _, entries, dir_size, _, comment = _EOCD.unpack_from(body, len(body) - _EOCD.size)
    if sig != b"PK\x05\x06" or comment != 0 or entries != 2 or dir_size > 4096:
        raise refuse(f"it must hold exactly {MODEL} and {MANIFEST}")
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            infos = {info.filename: info for info in z.infolist()}
            if sorted(infos) != sorted((MODEL, MANIFEST)):
                raise refuse(f"it must hold exactly {MODEL} and {MANIFEST}")
            data = {}
            for name, limit in ((MODEL, cap), (MANIFEST, MAX_MANIFEST_BYTES)):
                info = infos[name]
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise refuse(f"{name} is neither stored nor deflated")
                if info.flag_bits & 0x1:
                    raise refuse(f"{name} is encrypted")
                if info.file_size > limit:
                    raise refuse(f"{name} would inflate beyond {limit} bytes")
                data[name] = _inflate(z, info, limit)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise refuse(str(exc)) from None
    try:
        manifest = orjson.loads(data[MANIFEST])
    except orjson.JSONDecodeError:
        raise refuse(f"{MANIFEST} is not JSON") from None
    if (
        not isinstance(manifest, dict)
        or sorted(manifest) != sorted(FIELDS)
        or not all(isinstance(manifest[k], str) for k in FIELDS)
    ):
        raise refuse(f"{MANIFEST} must be an object of strings {', '.join(FIELDS)}")
    return data[MODEL], manifest


def _inflate(z: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    # In small reads: zipfile inflates as much as one read() asks for before cutting it to the
    # declared size, so a single read(limit) of a lying entry would inflate `limit` bytes.
    chunks, size = [], 0
    with z.open(info) as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise bad_request(
                    "InvalidModelImportFormat", f"{info.filename} inflates beyond {limit} bytes"
                )
            chunks.append(chunk)
    return b"".join(chunks)


def _check_archive(model: bytes, manifest: dict[str, Any], key: bytes, rt: LoopRuntime) -> None:
    """The archive was signed here, and holds a model of this loop and these arguments.

    A model trained with other arguments would silently serve a policy other than the one the
    loop's configuration shows, and one from another loop would carry that loop's learning
    into this one: both are refused. Either is still possible on purpose, as raw bytes."""
    if manifest["sha256"] != hashlib.sha256(model).hexdigest():
        raise bad_request("InvalidModelImportSignature", "the model does not match its checksum")
    if not hmac.compare_digest(manifest["signature"], _signature(key, manifest, model)):
        raise bad_request(
            "InvalidModelImportSignature", "the archive was not signed by this deployment"
        )
    raw = f"; to use it anyway, import its {MODEL} as raw bytes"
    if (manifest["loop"], manifest["kind"]) != (rt.name, rt.kind):
        raise bad_request(
            "InvalidModelMetadata",
            f"the archive holds a model of loop '{manifest['loop']}', not '{rt.name}'{raw}",
        )
    if manifest["arguments"] != rt.arguments:
        raise bad_request(
            "InvalidModelMetadata",
            f"the model was trained with '{manifest['arguments']}' and this loop trains "
            f"'{rt.arguments}': set that policy first{raw}",
        )


async def _read_capped(request: Request, cap: int) -> bytes:
    def too_big() -> ApiError:
        return ApiError(413, "PayloadSizeExceeded", f"model exceeds {cap} bytes")

    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise too_big()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_big()
        chunks.append(chunk)
    return b"".join(chunks)


@router.get("/personalizer/model")
def export_model(request: Request, signed: bool = False) -> Response:
    # Not AdminLoop: FastAPI checks `signed` after dependencies, and a malformed value has been
    # a 400 before the key's role and the loop are.
    d, rt = loop_for(request, admin=True)
    with d.sessions() as session:
        ckpt = store.get_checkpoint(session, loop=rt.name)
    model = ckpt.model if ckpt is not None else None
    model_id = ckpt.model_id if ckpt is not None else "N/A"
    if model is None:
        model = blank_model(rt.arguments)
    if signed:
        manifest = {
            "loop": rt.name,
            "kind": rt.kind,
            "modelId": model_id,
            "arguments": rt.arguments,
            "sha256": hashlib.sha256(model).hexdigest(),
        }
        manifest["signature"] = _signature(_signing_key(d), manifest, model)
        return Response(_archive(model, manifest), media_type="application/zip")
    return Response(model, media_type="application/octet-stream")


@router.put("/personalizer/model", status_code=204)
async def import_model(request: Request, d: State, rt: AdminLoop) -> Response:
    cap = d.settings.max_model_bytes
    body = await _read_capped(request, cap)
    if not body:
        raise bad_request("InvalidModelImportFormat", "request body must hold the model")
    model = body
    # A VW model starts with the length of its version string, never with a zip signature.
    if body.startswith(b"PK"):
        model, manifest = await run_in_threadpool(_unpack, body, cap)
        key = await run_in_threadpool(_signing_key, d)
        await run_in_threadpool(_check_archive, model, manifest, key, rt)
    try:
        await run_in_threadpool(check_model, model, kind=rt.kind)
    except PolicyError as exc:
        raise bad_request("InvalidModelImportFormat", str(exc)) from None
    await run_in_threadpool(d.control.reset_model, rt.name, model=model)
    return Response(status_code=204)


@router.delete("/personalizer/model", status_code=204)
def reset_model(d: State, rt: AdminLoop) -> Response:
    d.control.reset_model(rt.name, model=None)
    return Response(status_code=204)


@router.get("/personalizer/model/properties")
def get_model_properties(d: State, rt: ViewLoop) -> dict[str, str]:
    with d.sessions() as session:
        ckpt = store.get_checkpoint(session, loop=rt.name)
        loop_created = session.get(Loop, rt.name)
    created = ckpt.created_at if ckpt else (loop_created.created_at if loop_created else d.clock())
    modified = ckpt.modified_at if ckpt else created
    return {"creationTime": timestamp(created), "lastModifiedTime": timestamp(modified)}
