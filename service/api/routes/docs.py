"""The API docs: Swagger UI at /docs with its assets served from this server.

The assets come from the swagger-ui-bundle-v2 package (Swagger UI 5, which renders the
OpenAPI 3.1 document FastAPI writes), so a page that holds a key in the browser loads no script
from a CDN. Public like /openapi.json: they describe the API, hold no data, and a browser
opening /docs cannot send a key header. `DLOOP_DOCS=false` turns both off.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse
from swagger_ui_bundle import swagger_ui_path

ASSETS = "/docs/swagger-ui"


def install(app: FastAPI) -> None:
    """Serve /docs; the app must have been built with `docs_url=None` and an `openapi_url`."""
    assert app.openapi_url is not None
    openapi_url = app.openapi_url
    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
