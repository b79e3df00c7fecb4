"""The OpenAPI document (service.api.openapi): its operation table describes every operation and
nothing else, and an operation missing from it still gets the default error answers."""

from __future__ import annotations

from typing import Any

from starlette.routing import Route

from service.api import openapi
from service.app import create_app
from service.core.settings import Settings

# The document does not depend on settings; the app it comes from is never started.
DOCUMENT = create_app(Settings()).openapi()


def test_the_table_describes_every_operation_and_nothing_else() -> None:
    on_loops = {name for name, op in openapi.OPERATIONS.items() if op.kind in ("loop", "hot")}
    documented = {op["operationId"] for item in DOCUMENT["paths"].values() for op in item.values()}
    assert documented == set(openapi.OPERATIONS) | {f"{name}_in_loop" for name in on_loops}
    for item in DOCUMENT["paths"].values():
        for op in item.values():
            assert {"408", "413"} <= set(op["responses"]), op["operationId"]


def test_an_operation_missing_from_the_table_gets_the_default_errors() -> None:
    async def new(request: Any) -> Any: ...

    app = create_app(Settings())
    doc = openapi.document(app, [Route("/personalizer/new/{thing}", new, methods=["POST"])])
    for path in ("/personalizer/new/{thing}", "/loops/{loop}/personalizer/new/{thing}"):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"2XX", *(str(s) for s in openapi.DEFAULT_ERRORS)}
        assert responses["401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
