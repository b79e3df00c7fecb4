"""Model export, import, reset and properties.

Export is the trainer's checkpoint (VW model bytes, resumable). With `signed=true` it is a zip
holding `model.vw` and `manifest.json` (loop, model id, arguments, SHA-256 of the model); import
takes either form and checks the digest of a zip before anything is replaced.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from learners.cb import CBTrainer
from learners.joiner import timestamp
from learners.vw import PolicyError, check_model
from service import store
from service.context import loop_for
from service.errors import ApiError, bad_request
from service.models import Loop

router = APIRouter()

MAX_MODEL_BYTES = 512 << 20


def _signed(model: bytes, manifest: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("model.vw", model)
        z.writestr("manifest.json", orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return buf.getvalue()


def _unsigned(body: bytes) -> bytes:
    if not body.startswith(b"PK"):
        return body
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            model = z.read("model.vw")
            manifest = orjson.loads(z.read("manifest.json"))
    except (zipfile.BadZipFile, KeyError, orjson.JSONDecodeError) as exc:
        raise bad_request("InvalidModelImportFormat", f"not a dloop model archive: {exc}") from None
    if manifest.get("sha256") != hashlib.sha256(model).hexdigest():
        raise bad_request("InvalidModelImportSignature", "model digest does not match manifest")
    return model


@router.get("/personalizer/model")
def export_model(request: Request, signed: bool = False) -> Response:
    d, rt = loop_for(request, admin=True)
    with d.sessions() as session:
        ckpt = store.get_checkpoint(session, loop=rt.name)
    model = ckpt.model if ckpt is not None else None
    model_id = ckpt.model_id if ckpt is not None else "N/A"
    if model is None:
        model = CBTrainer(rt.arguments).to_bytes()
    if signed:
        manifest = {
            "loop": rt.name,
            "modelId": model_id,
            "arguments": rt.arguments,
            "sha256": hashlib.sha256(model).hexdigest(),
        }
        return Response(_signed(model, manifest), media_type="application/zip")
    return Response(model, media_type="application/octet-stream")


@router.put("/personalizer/model", status_code=204)
async def import_model(request: Request) -> Response:
    d, rt = loop_for(request, admin=True)
    body = await request.body()
    if len(body) > MAX_MODEL_BYTES:
        raise ApiError(413, "PayloadSizeExceeded", f"model exceeds {MAX_MODEL_BYTES} bytes")
    if not body:
        raise bad_request("InvalidModelImportFormat", "request body must hold the model")
    model = _unsigned(body)
    try:
        await run_in_threadpool(check_model, model, kind=rt.kind)
    except PolicyError as exc:
        raise bad_request("InvalidModelImportFormat", str(exc)) from None
    await run_in_threadpool(d.reset_model, rt.name, model=model)
    return Response(status_code=204)


@router.delete("/personalizer/model", status_code=204)
def reset_model(request: Request) -> Response:
    d, rt = loop_for(request, admin=True)
    d.reset_model(rt.name, model=None)
    return Response(status_code=204)


@router.get("/personalizer/model/properties")
def get_model_properties(request: Request) -> dict[str, str]:
    d, rt = loop_for(request, admin=True)
    with d.sessions() as session:
        ckpt = store.get_checkpoint(session, loop=rt.name)
        loop_created = session.get(Loop, rt.name)
    created = ckpt.created_at if ckpt else (loop_created.created_at if loop_created else d.clock())
    modified = ckpt.modified_at if ckpt else created
    return {"creationTime": timestamp(created), "lastModifiedTime": timestamp(modified)}
