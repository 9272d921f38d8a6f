"""``privlora registry serve``: the registry over HTTP (FastAPI + uvicorn). Every route but ``/health``
authenticates the bearer token, then calls :class:`~privlora.registry.service.Registry`, which decides,
logs and acts. Refusals are 4xx ``{"error": "<one line>"}``; the server stays up.

Routes: ``GET /adapters``, ``POST /adapters`` (JSON: name, weights_b64, config, privacy, audit, files:
{"config.yaml": text, "splits.json": text}), ``GET /adapters/{id}``, ``GET /adapters/{id}/weights``,
``GET /adapters/{id}/files/{name}``, ``POST /exports`` (adapter), ``POST /exports/{id}/approve``,
``GET /exports/{id}/download``, ``GET|POST /users``, ``GET|POST /incidents`` (adapter, reason),
``GET /incidents/{id}`` (with its reports), ``POST /incidents/{id}/report`` (status audited|not_audited,
report), ``POST /incidents/{id}/close`` (resolution), ``GET /log``, ``GET /log/verify`` (``?expect_head=``
a published head), ``GET|POST /datasets`` (name, kind sanitized|full, data_b64, format file|tar; the
format comes back in the ``X-Dataset-Format`` header), ``GET /datasets/{id}/data``,
``GET|POST /generations`` (adapter, prompt, params, image_b64; metadata-only readers get neither prompt nor image).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from privlora.httpapi import bearer, read_body, service_app
from privlora.registry.service import Principal, Refused, Registry

DEFAULT_MAX_BODY = 64 * 1024 * 1024
log = logging.getLogger("privlora.registry")


def create_app(registry: Registry, *, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    app = service_app("privlora registry", log)

    def who(request: Request) -> Principal:
        return registry.authenticate(bearer(request))

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await read_body(request, max_body))
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

    def b64(body: dict[str, Any], name: str, required: bool = True) -> bytes | None:
        value = field(body, name, str, ... if required else "")
        try:
            return base64.b64decode(value, validate=True) if value else None
        except binascii.Error:
            raise Refused(422, f"{name} is not base64") from None

    @app.get("/adapters")
    def list_adapters(request: Request) -> list[dict[str, Any]]:
        return registry.list(who(request))

    @app.post("/adapters")
    async def push(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await json_body(request)
        files = field(body, "files", dict, {})
        if not all(isinstance(v, str) for v in files.values()):
            raise Refused(422, "field 'files' maps file names to their text")
        return registry.push(principal, b64(body, "weights_b64") or b"", name=field(body, "name", str),
                             config=field(body, "config", dict), privacy=field(body, "privacy", dict, {}),
                             audit=field(body, "audit", dict, {}),
                             files={k: v.encode() for k, v in files.items()})

    @app.get("/adapters/{adapter_id}")
    def show(adapter_id: str, request: Request) -> dict[str, Any]:
        return registry.show(who(request), adapter_id)

    @app.get("/adapters/{adapter_id}/weights")
    def pull(adapter_id: str, request: Request) -> Response:
        _, weights = registry.pull(who(request), adapter_id)
        return Response(weights, media_type="application/octet-stream")

    @app.get("/adapters/{adapter_id}/files/{name}")
    def adapter_file(adapter_id: str, name: str, request: Request) -> Response:
        return Response(registry.adapter_file(who(request), adapter_id, name), media_type="text/plain")

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

    @app.get("/incidents")
    def list_incidents(request: Request) -> list[dict[str, Any]]:
        return registry.list_incidents(who(request))

    @app.get("/incidents/{incident_id}")
    def show_incident(incident_id: int, request: Request) -> dict[str, Any]:
        return registry.show_incident(who(request), incident_id)

    @app.post("/incidents/{incident_id}/report")
    async def report_incident(incident_id: int, request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await json_body(request)
        return registry.report_incident(principal, incident_id, status=field(body, "status", str),
                                        report=field(body, "report", dict))

    @app.post("/incidents/{incident_id}/close")
    async def close_incident(incident_id: int, request: Request) -> dict[str, Any]:
        principal = who(request)
        return registry.close_incident(principal, incident_id, field(await json_body(request), "resolution", str))

    @app.get("/datasets")
    def list_datasets(request: Request) -> list[dict[str, Any]]:
        return registry.list_datasets(who(request))

    @app.post("/datasets")
    async def push_dataset(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await json_body(request)
        return registry.push_dataset(principal, b64(body, "data_b64") or b"", name=field(body, "name", str),
                                     kind=field(body, "kind", str), fmt=field(body, "format", str, "file"))

    @app.get("/datasets/{dataset_id}/data")
    def pull_dataset(dataset_id: str, request: Request) -> Response:
        dataset, data = registry.pull_dataset(who(request), dataset_id)
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Dataset-Format": dataset.get("format") or "file"})

    @app.get("/generations")
    def generations(request: Request) -> list[dict[str, Any]]:
        return registry.generation_logs(who(request))

    @app.post("/generations")
    async def log_generation(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await json_body(request)
        return registry.log_generation(principal, adapter=field(body, "adapter", str),
                                       prompt=field(body, "prompt", str), params=field(body, "params", dict, {}),
                                       image=b64(body, "image_b64", False))

    @app.get("/log")
    def read_log(request: Request) -> list[dict[str, Any]]:
        return registry.log(who(request))

    @app.get("/log/verify")
    def verify_log(request: Request, expect_head: str | None = None) -> dict[str, Any]:
        return registry.verify_log(who(request), expect_head)

    return app
