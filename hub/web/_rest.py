"""The REST API (/v1/..., docs/rest.md): one table of endpoints, each mapping HTTP onto a control request class.

A request goes: Bearer token -> the operator's rate -> the least role of the request (hub.control.REQUESTS) -> the
request class built from path, query and JSON body (the same checks as on the control channel) -> the one handler
both doors use (`hub.control.Operations`) -> JSON. A refusal is `{"error": {"code", "message"}}` with the status of
`STATUS` (the control channel's codes) or one of the HTTP-only codes of `HTTP_CODES`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from hub.control import (
    Caller,
    CancelCommand,
    Command,
    Commands,
    ControlError,
    ControlServer,
    Device,
    DeviceAdd,
    DeviceLabel,
    DeviceRevoke,
    DeviceRotate,
    Devices,
    ErrorCode,
    Job,
    JobCancel,
    JobCreate,
    Jobs,
    Request,
    Result,
    SendCommand,
    Status,
    Twin,
    TwinSet,
    retry_seconds,
    spec_for,
)
from hub.edge import Unavailable
from hub.fleet import StoreUnavailable

__all__ = ["ENDPOINTS", "HTTP_CODES", "OPENAPI_PATH", "STATUS", "Endpoint", "RestApi"]

log = logging.getLogger("hub.web")

OPENAPI_PATH = "/v1/openapi.json"

#: The control channel's error codes -> HTTP status (docs/rest.md, "Errors").
STATUS: Mapping[str, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_TYPE: 404,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.INVALID_STATE: 409,
    ErrorCode.QUEUE_FULL: 409,
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: 409,
    ErrorCode.BAD_COMMAND: 422,
    ErrorCode.BAD_LABEL: 422,
    ErrorCode.BAD_PATCH: 422,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.VERSION_CONFLICT: 409,
    ErrorCode.EXISTS: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}
#: Codes only HTTP answers with -> status.
HTTP_CODES: Mapping[str, int] = {"unauthorized": 401, "too_large": 413, "unsupported_media_type": 415}

#: `POST /v1/commands` with `wait` one operator may have in progress (as one control session may).
MAX_WAITS = 32
#: Seconds a client waits before retrying when the state store is away.
UNAVAILABLE_RETRY = 5


@attrs.frozen
class Endpoint:
    """One REST route: the request class it builds and where its arguments come from."""

    method: str
    path: str  # Starlette's path syntax: {name} is a path parameter of the same name as the request's field
    request: type[Request]
    summary: str
    status: int = 200  # on success
    query: tuple[str, ...] = ()  # request fields read from the query string
    body: bool = False  # request fields read from a JSON object body

    @property
    def path_params(self) -> list[str]:
        """The names of the path parameters, in order."""
        return [part[1:-1] for part in self.path.split("/") if part.startswith("{")]


#: Every REST route but the OpenAPI document itself.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/v1/status", Status, "The hub's figures"),
    Endpoint(
        "GET",
        "/v1/devices",
        Devices,
        "Device summaries, optionally of one state and label selector",
        query=("state", "selector"),
    ),
    Endpoint("POST", "/v1/devices", DeviceAdd, "Register a device; the answer holds its token", 201, body=True),
    Endpoint("GET", "/v1/devices/{name}", Device, "One device: summary, latest values, recent commands"),
    Endpoint("POST", "/v1/devices/{name}/revoke", DeviceRevoke, "Revoke a device's token; its session is closed"),
    Endpoint("POST", "/v1/devices/{name}/rotate", DeviceRotate, "Give a device a new token; the answer holds it"),
    Endpoint(
        "POST",
        "/v1/devices/{name}/labels",
        DeviceLabel,
        "Remove and set a device's labels; the answer holds them",
        body=True,
    ),
    Endpoint("GET", "/v1/devices/{device}/twin", Twin, "A device's twin: desired, reported, applied version, delta"),
    Endpoint(
        "PATCH",
        "/v1/devices/{device}/twin",
        TwinSet,
        "Merge a patch into a device's desired document (if_version: only at that version)",
        body=True,
    ),
    Endpoint("GET", "/v1/commands", Commands, "Command records, newest first", query=("device", "state", "limit")),
    Endpoint("POST", "/v1/commands", SendCommand, "Send a command (with wait: answered once final)", 202, body=True),
    Endpoint("GET", "/v1/commands/{command_id}", Command, "One command record"),
    Endpoint("POST", "/v1/commands/{command_id}/cancel", CancelCommand, "Cancel a command still queued or sent"),
    Endpoint("GET", "/v1/jobs", Jobs, "Job records, newest first", query=("state", "limit")),
    Endpoint("POST", "/v1/jobs", JobCreate, "Start a job on every device a selector matches", 201, body=True),
    Endpoint(
        "GET",
        "/v1/jobs/{job_id}",
        Job,
        "One job: progress counts and a page of its devices",
        query=("state", "limit", "offset"),
    ),
    Endpoint("POST", "/v1/jobs/{job_id}/cancel", JobCancel, "Cancel a running job"),
)


class _Refusal(Exception):
    """An HTTP answer other than success: status, code, message and extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, error: ControlError, headers: Mapping[str, str] | None = None) -> _Refusal:
        return cls(STATUS[error.code], error.code, error.message, headers)

    def response(self) -> Response:
        body = {"error": {"code": self.code, "message": self.message}}
        return JSONResponse(body, self.status, {"cache-control": "no-store", **self.headers})


class RestApi:
    """The REST routes over a control server's `Operations`, and what the console's config.json tells a browser."""

    def __init__(
        self,
        control: ControlServer,
        *,
        ws_port: Callable[[], int | None],
        tls: bool,
        default_host: str = "127.0.0.1",
        openapi: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.control = control
        self.ws_port = ws_port
        self.tls = tls
        self.default_host = default_host
        self.max_body = control.config.control.max_message_bytes
        self._openapi = openapi
        self._waits: dict[str, trio.Semaphore] = {}  # per operator: its sends with `wait` in progress

    def routes(self) -> list[BaseRoute]:
        """One Starlette route per endpoint, and the OpenAPI document."""
        routes: list[BaseRoute] = [
            Route(e.path, self._endpoint(e), methods=[e.method], name=e.request.__name__) for e in ENDPOINTS
        ]
        if self._openapi is not None:
            document = self._openapi

            async def openapi(request: HttpRequest) -> Response:
                return JSONResponse(document())

            routes.append(Route(OPENAPI_PATH, openapi, methods=["GET"], name="openapi"))
        return routes

    def _endpoint(self, endpoint: Endpoint) -> Callable[[HttpRequest], Any]:
        async def handle(request: HttpRequest) -> Response:
            try:
                return await self._serve(endpoint, request)
            except _Refusal as refusal:
                return refusal.response()

        return handle

    async def _serve(self, endpoint: Endpoint, http: HttpRequest) -> Response:
        caller = await self._caller(http)
        operations = self.control.operations
        wait = operations.retry_after(caller.operator)
        if wait:
            log.debug("request refused", extra=caller.kv(reason="rate_limited", path=http.url.path))
            raise _Refusal.of(operations.rate_error(), {"retry-after": str(retry_seconds(wait))})
        spec = spec_for(endpoint.request)
        try:
            operations.check_role(caller, spec)
            request = spec.decode(await self._arguments(endpoint, http))
            status = endpoint.status
            if isinstance(request, SendCommand) and request.wait:
                waits = self._waits.setdefault(caller.operator, trio.Semaphore(MAX_WAITS))
                if waits.value == 0:
                    message = f"at most {MAX_WAITS} sends with wait at once per operator: poll instead"
                    raise _Refusal(429, ErrorCode.RATE_LIMITED, message, {"retry-after": "1"})
                async with waits:
                    record = await operations.submit(caller, request)
                    result: Result = await operations.wait_final(request, record["command_id"])
                status = 200
            else:
                result = await operations.run(caller, request)
        except ControlError as exc:
            level = logging.DEBUG if exc.code == ErrorCode.RATE_LIMITED else logging.INFO
            log.log(level, "request refused", extra=caller.kv(reason=exc.code, path=http.url.path))
            raise _Refusal.of(exc) from None
        except StoreUnavailable as exc:
            log.warning("rest request without its state store", extra=caller.kv(error=str(exc)))
            message = "the hub cannot reach its state store; retry later"
            raise _Refusal(503, ErrorCode.UNAVAILABLE, message, {"retry-after": str(UNAVAILABLE_RETRY)}) from None
        except _Refusal:
            raise
        except Exception:
            log.exception("rest request failed", extra=caller.kv(path=http.url.path))
            raise _Refusal(500, ErrorCode.INTERNAL, "internal error") from None
        return JSONResponse(result, status, {"cache-control": "no-store"})

    async def _caller(self, http: HttpRequest) -> Caller:
        """The operator of the request's Bearer token; 401 (with WWW-Authenticate) without a good one."""
        auth = http.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        challenge = {"www-authenticate": 'Bearer realm="hub"'}
        if not token:
            raise _Refusal(401, "unauthorized", "an operator token is needed: Authorization: Bearer <token>", challenge)
        try:
            identity = await self.control.authenticate(token)
        except Unavailable:
            message = "cannot check credentials now; retry later"
            raise _Refusal(503, ErrorCode.UNAVAILABLE, message, {"retry-after": str(UNAVAILABLE_RETRY)}) from None
        remote = f"{http.client.host}:{http.client.port}" if http.client else ""
        if identity is None:
            self.control.stats.refused += 1
            log.warning("rest request refused", extra={"kv": {"reason": "bad_credentials", "remote": remote}})
            challenge = {"www-authenticate": 'Bearer realm="hub", error="invalid_token"'}
            raise _Refusal(401, "unauthorized", "unknown or revoked token", challenge)
        return Caller(identity.name, identity.role, remote, "rest")

    async def _arguments(self, endpoint: Endpoint, http: HttpRequest) -> dict[str, object]:
        """The request's fields: path parameters, then query parameters, then the JSON body's members."""
        args: dict[str, object] = {}
        if endpoint.body:
            args.update(await self._body(http))
        fields = {f.name: f for f in attrs.fields(endpoint.request)}
        for name in endpoint.query:
            value = http.query_params.get(name)
            if value is not None:
                args[name] = _query_value(value, fields[name].default)
        if isinstance(endpoint.request, type) and issubclass(endpoint.request, SendCommand):
            key = http.headers.get("idempotency-key")
            if key is not None:
                given = args.get("idempotency_key")
                if given is not None and given != key:
                    raise ControlError(ErrorCode.BAD_REQUEST, "Idempotency-Key and idempotency_key differ")
                args["idempotency_key"] = key
        args.update(http.path_params)
        return args

    async def _body(self, http: HttpRequest) -> dict[str, object]:
        """The JSON object body, at most `max_body` bytes (413 past it, counted as it arrives)."""
        limit = self.max_body
        too_large = _Refusal(413, "too_large", f"the body is over {limit} bytes")
        length = http.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large
        content_type = http.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise _Refusal(415, "unsupported_media_type", "send the body as application/json")
        data = bytearray()
        async for chunk in http.stream():
            data += chunk
            if len(data) > limit:
                raise too_large
        if not data:
            return {}
        try:
            body = json.loads(bytes(data), parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise ControlError(ErrorCode.BAD_REQUEST, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ControlError(ErrorCode.BAD_REQUEST, "the body is a JSON object")
        return body


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _query_value(value: str, default: object) -> object:
    """A query string value as the field's type: integers for integer fields (else left for the check to refuse)."""
    if isinstance(default, int) and not isinstance(default, bool):
        with contextlib.suppress(ValueError):
            return int(value)
    return value
