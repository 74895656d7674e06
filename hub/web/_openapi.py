"""The REST API's OpenAPI 3.1 document, built from the endpoint table and the request classes (it cannot drift)."""

from __future__ import annotations

import functools
from typing import Any

import attrs

from hub.control import VERSION, Reply, spec_for
from hub.web._rest import ENDPOINTS, HTTP_CODES, OPENAPI_PATH, STATUS, Endpoint

__all__ = ["openapi"]

_ERROR = {"$ref": "#/components/responses/Error"}


def _schema(annotation: object) -> dict[str, Any]:
    """A JSON schema of a request field from its annotation (a string: the codec uses postponed annotations)."""
    text = str(annotation)
    nullable = "None" in text
    if text.startswith("bool"):
        schema: dict[str, Any] = {"type": "boolean"}
    elif text.startswith("int"):
        schema = {"type": "integer"}
    elif text.startswith("float"):
        schema = {"type": "number"}
    elif text.startswith("dict"):
        schema = {"type": "object"}
    elif text.startswith("tuple") or text.startswith("list"):
        schema = {"type": "array", "items": {"type": "string"}}
    else:
        schema = {"type": "string"}
    if nullable:
        schema = {"anyOf": [schema, {"type": "null"}]}
    return schema


def _field_schema(field: attrs.Attribute[Any]) -> dict[str, Any]:
    schema = _schema(field.type)
    if field.default is not attrs.NOTHING and field.default is not None:
        schema["default"] = field.default
    return schema


def _result_schema(reply: Reply) -> dict[str, Any]:
    kind = "array" if reply.json_type is list else "object"
    return {"type": kind, "description": reply.value}


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    spec = spec_for(endpoint.request)
    fields = {f.name: f for f in attrs.fields(endpoint.request)}
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in endpoint.path_params
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": _field_schema(fields[name])}
        for name in endpoint.query
    ]
    operation: dict[str, Any] = {
        "operationId": spec.type,
        "summary": endpoint.summary,
        "description": f"The control channel's `{spec.type}` request; least role: {spec.role}.",
        "x-role": spec.role,
        "parameters": parameters,
        "responses": {
            str(endpoint.status): {
                "description": spec.reply.value,
                "content": {"application/json": {"schema": _result_schema(spec.reply)}},
            },
            "default": _ERROR,
        },
    }
    if endpoint.body:
        in_body = [f for name, f in fields.items() if name not in endpoint.path_params]
        operation["requestBody"] = {
            "required": any(f.default is attrs.NOTHING for f in in_body),
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {f.name: _field_schema(f) for f in in_body},
                        "required": [f.name for f in in_body if f.default is attrs.NOTHING],
                    }
                }
            },
        }
    if endpoint.request.__name__ == "SendCommand":
        parameters.append({"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}})
        operation["responses"]["200"] = {
            "description": "with wait: the record once final, or as it is at wait_timeout",
            "content": {"application/json": {"schema": _result_schema(spec.reply)}},
        }
    return operation


@functools.cache
def openapi() -> dict[str, Any]:
    """The OpenAPI document of every REST endpoint (and the error shape and status table of docs/rest.md)."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint)
    paths[OPENAPI_PATH] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
        }
    }
    codes = {**{str(k): v for k, v in STATUS.items()}, **HTTP_CODES}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Telemetry hub REST API",
            "version": VERSION,
            "description": "Same tokens, roles, error codes and rate limits as the control channel (docs/rest.md).",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string", "enum": sorted(codes)},
                                "message": {"type": "string"},
                            },
                        }
                    },
                }
            },
            "responses": {
                "Error": {
                    "description": "A refusal; its status by code: "
                    + ", ".join(f"{code} {status}" for code, status in sorted(codes.items())),
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
        },
    }
