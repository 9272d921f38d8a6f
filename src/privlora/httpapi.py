"""What every privlora HTTP service shares: refusals as one-line JSON, a body-size limit enforced while
streaming, the bearer token from the header, a ``/health`` route, ``/openapi.json``, and (client side)
reading a refusal. Used by the split server and the registry so both answer bad requests the same way.

OpenAPI: FastAPI builds the schema from the routes themselves, so a route cannot be missing from it; each
route states its request body (:func:`json_body`, :func:`binary_body`) and every 4xx it can answer
(:func:`errors`) in its decorator, next to the code that raises them.
"""

from __future__ import annotations

import logging
from typing import Any

from privlora.extras import missing_extra

try:  # the split server/client and the registry share this module: a missing extra is one line naming both
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
except ModuleNotFoundError as e:
    raise (missing_extra(e) or e) from None

ERROR_SCHEMA: dict[str, Any] = {"type": "object", "required": ["error"],
                                "properties": {"error": {"type": "string", "description": "one-line reason"}}}
REASONS = {400: "malformed body (not JSON, not base64, non-finite weights)",
           401: "missing, unknown, expired or revoked bearer token", 403: "not allowed for this role",
           404: "no such record", 409: "conflicts with the record's state", 413: "request body over the limit",
           422: "a field is missing, of the wrong type, or refused",
           503: "busy with another client's step: retry (the split server's one deliberate 5xx)"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the refusals a route gives, all ``{"error": "<one line>"}``."""
    return {code: {"description": REASONS[code], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for code in codes}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads a JSON object itself (see the registry's ``json_body``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def binary_body() -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is safetensors bytes."""
    return {"requestBody": {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}}


class Refusal(Exception):
    """A request a service will not serve: HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def refusal_reason(response: Any) -> str:
    """The one-line reason of a 4xx/5xx answer from a privlora service (its ``error``), for the clients."""
    try:
        return str(response.json().get("error", response.text))
    except (ValueError, AttributeError):
        return response.text[:200]


def bearer(request: Request) -> str:
    """The token of an ``Authorization: Bearer …`` header ('' if absent or another scheme)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def read_body(request: Request, max_body: int) -> bytes:
    """The request body, refused with 413 once it passes ``max_body`` (declared or counted while streaming)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_body):
        raise Refusal(413, f"request body over the {max_body} byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise Refusal(413, f"request body over the {max_body} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def service_app(title: str, log: logging.Logger) -> FastAPI:
    """A FastAPI app with ``/openapi.json`` (no HTML docs routes), ``/health``, and the shared error answers."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  description="Every refusal is a 4xx with {\"error\": \"<one line>\"}; authenticate with "
                              "Authorization: Bearer <token>.")

    @app.exception_handler(Refusal)
    async def _refused(request: Request, exc: Refusal) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "malformed request"}, status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s: error on %s", title, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
