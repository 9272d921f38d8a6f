"""``privlora registry serve``: the registry over HTTP (FastAPI + uvicorn). Every route but ``/health``
authenticates the bearer token, then calls :class:`~privlora.registry.service.Registry`, which decides,
logs and acts. Refusals are 4xx ``{"error": "<one line>"}``; the server stays up.

Routes: ``GET /adapters``, ``POST /adapters`` (JSON: name, weights_b64, config, privacy, audit),
``GET /adapters/{id}``, ``GET /adapters/{id}/weights``, ``POST /exports`` (adapter),
``POST /exports/{id}/approve``, ``GET /exports/{id}/download``, ``GET|POST /users``, ``POST /incidents``
(adapter, reason), ``POST /incidents/{id}/close`` (resolution), ``GET /log``, ``GET /log/verify``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from privlora.registry.service import Principal, Refused, Registry

DEFAULT_MAX_BODY = 64 * 1024 * 1024
log = logging.getLogger("privlora.registry")


def create_app(registry: Registry, *, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    app = FastAPI(title="privlora registry", docs_url=None, redoc_url=None, openapi_url=None)

    def who(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return registry.authenticate(token.strip() if scheme.lower() == "bearer" else "")

    async def json_body(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body):
            raise Refused(413, f"request body over the {max_body} byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise Refused(413, f"request body over the {max_body} byte limit")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise Refused(400, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "request body must be a JSON object")
        return body

    def field(body: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
        value = body.get(name, default)
        if value is ...:
            raise Refused(422, f"missing field {name!r}")
        if not isinstance(value, kind):
            raise Refused(422, f"field {name!r} must be {kind.__name__}")
        return value

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "malformed request"}, status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("registry error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/adapters")
    def list_adapters(request: Request) -> list[dict[str, Any]]:
        return registry.list(who(request))

    @app.post("/adapters")
    async def push(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await json_body(request)
        try:
            weights = base64.b64decode(field(body, "weights_b64", str), validate=True)
        except binascii.Error:
            raise Refused(422, "weights_b64 is not base64") from None
        return registry.push(principal, weights, name=field(body, "name", str), config=field(body, "config", dict),
                             privacy=field(body, "privacy", dict, {}), audit=field(body, "audit", dict, {}))

    @app.get("/adapters/{adapter_id}")
    def show(adapter_id: str, request: Request) -> dict[str, Any]:
        return registry.show(who(request), adapter_id)

    @app.get("/adapters/{adapter_id}/weights")
    def pull(adapter_id: str, request: Request) -> Response:
        _, weights = registry.pull(who(request), adapter_id)
        return Response(weights, media_type="application/octet-stream")

    @app.post("/exports")
    async def request_export(request: Request) -> dict[str, Any]:
        principal = who(request)
        return registry.request_export(principal, field(await json_body(request), "adapter", str))

    @app.post("/exports/{export_id}/approve")
    def approve(export_id: int, request: Request) -> dict[str, Any]:
        return registry.approve_export(who(request), export_id)

    @app.get("/exports/{export_id}/download")
    def download(export_id: int, request: Request) -> Response:
        return Response(registry.download_export(who(request), export_id), media_type="application/octet-stream")

    @app.get("/users")
    def users(request: Request) -> list[dict[str, Any]]:
        return registry.list_users(who(request))

    @app.post("/users")
    async def add_user(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await json_body(request)
        name, role = field(body, "name", str), field(body, "role", str)
        return {"name": name, "role": role, "token": registry.add_user(principal, name, role)}

    @app.post("/incidents")
    async def open_incident(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await json_body(request)
        return registry.open_incident(principal, field(body, "adapter", str), field(body, "reason", str))

    @app.post("/incidents/{incident_id}/close")
    async def close_incident(incident_id: int, request: Request) -> dict[str, Any]:
        principal = who(request)
        return registry.close_incident(principal, incident_id, field(await json_body(request), "resolution", str))

    @app.get("/log")
    def read_log(request: Request) -> list[dict[str, Any]]:
        return registry.log(who(request))

    @app.get("/log/verify")
    def verify_log(request: Request) -> dict[str, Any]:
        return registry.verify_log(who(request))

    return app
