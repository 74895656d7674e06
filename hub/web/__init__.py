"""The hub's HTTP side (docs/rest.md): a Starlette app on Hypercorn's trio worker serving /metrics, /healthz, the REST
API over the control channel's `Operations`, its OpenAPI document, and the web console's static files.

`_serve` runs any ASGI app in the hub's nursery (our sockets, the hub's TLS context); `_app` builds the app; `_rest`
holds the one table of REST endpoints; `_openapi` builds the OpenAPI document from that table.
"""

from hub.web._app import CONSOLE_DIR, CONTENT_SECURITY_POLICY, Page, web_app
from hub.web._openapi import openapi
from hub.web._rest import ENDPOINTS, HTTP_CODES, MAX_WAITS, OPENAPI_PATH, STATUS, Endpoint, RestApi
from hub.web._serve import serve_asgi

__all__ = [
    "CONSOLE_DIR",
    "CONTENT_SECURITY_POLICY",
    "ENDPOINTS",
    "HTTP_CODES",
    "MAX_WAITS",
    "OPENAPI_PATH",
    "STATUS",
    "Endpoint",
    "Page",
    "RestApi",
    "openapi",
    "serve_asgi",
    "web_app",
]
