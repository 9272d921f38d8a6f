"""``privlora registry serve``: the registry over HTTP (FastAPI + uvicorn). Every route but ``/health``
authenticates the bearer token, then calls :class:`~privlora.registry.service.Registry`, which decides,
logs and acts. Refusals are 4xx ``{"error": "<one line>"}``; the server stays up.

Routes: ``GET /adapters``, ``POST /adapters`` (JSON: name, weights_b64, config, privacy, audit, files:
{"config.yaml": text, "splits.json": text}), ``GET /adapters/{id}``, ``GET /adapters/{id}/weights``
(``?format=`` peft | diffusers | kohya, as on ``/exports/{id}/download``),
``GET /adapters/{id}/files/{name}``, ``POST /exports`` (adapter), ``POST /exports/{id}/approve``,
``GET /exports/{id}/download``, ``GET|POST /users``, ``GET|POST /incidents`` (adapter, reason),
``GET /incidents/{id}`` (with its reports), ``POST /incidents/{id}/report`` (status audited|not_audited,
report), ``POST /incidents/{id}/close`` (resolution), ``GET /log``, ``GET /log/verify`` (``?expect_head=``
a published head), ``GET|POST /datasets`` (name, kind sanitized|full, data_b64, format file|tar; the
format comes back in the ``X-Dataset-Format`` header), ``GET /datasets/{id}/data``,
``GET|POST /generations`` (adapter, prompt, params, image_b64; metadata-only readers get neither prompt nor image),
``POST /adapters/{id}/audit`` (an auditor's results.json), ``POST /users/{name}/revoke``, ``GET /openapi.json``.
The request bodies and every 4xx of each route are declared in its decorator (the ``BODIES`` schemas below),
so ``/openapi.json`` is generated from the routes and cannot drift from them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from privlora.httpapi import bearer, errors, json_body, read_body, service_app
from privlora.registry.service import Principal, Refused, Registry

DEFAULT_MAX_BODY = 64 * 1024 * 1024
log = logging.getLogger("privlora.registry")

_S, _O = {"type": "string"}, {"type": "object"}
_B64 = {"type": "string", "contentEncoding": "base64"}


def _obj(required: list[str], **props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


#: the JSON bodies the routes read (documented in /openapi.json; the checks are in the handlers)
BODIES: dict[str, dict[str, Any]] = {
    "push": _obj(["name", "weights_b64", "config"], name=_S, weights_b64=_B64, config=_O, privacy=_O, audit=_O,
                 files={"type": "object", "additionalProperties": _S}),
    "export": _obj(["adapter"], adapter=_S),
    "user": _obj(["name", "role"], name=_S, role={"type": "string", "enum": ["researcher", "engineer", "auditor",
                                                                              "admin"]},
                 expires_days={"type": "number", "exclusiveMinimum": 0, "maximum": 3650}),
    "incident": _obj(["adapter", "reason"], adapter=_S, reason=_S),
    "report": _obj(["status", "report"], status={"type": "string", "enum": ["audited", "not_audited"]}, report=_O),
    "close": _obj(["resolution"], resolution=_S),
    "dataset": _obj(["name", "kind", "data_b64"], name=_S, kind={"type": "string", "enum": ["sanitized", "full"]},
                    data_b64=_B64, format={"type": "string", "enum": ["file", "tar"]}),
    "generation": _obj(["adapter", "prompt"], adapter=_S, prompt=_S, params=_O, image_b64=_B64),
    "audit": _obj(["attacks"], attacks=_O),
}
#: ``?format=`` of the weight downloads: the stored peft file (default) or a conversion (:mod:`privlora.export`)
FORMAT = Query(None, alias="format", description="peft (default: the stored file) | diffusers | kohya")
AUTH = (401, 403, 422)  # every route but /health and /openapi.json (422: a malformed path or query)
BODY = (400, 413)  # every route that reads a JSON body (and 422 for its fields)


def create_app(registry: Registry, *, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    app = service_app("privlora registry", log)

    def who(request: Request) -> Principal:
        return registry.authenticate(bearer(request))

    async def read_json(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await read_body(request, max_body))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise Refused(400, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "request body must be a JSON object")
        return body

    def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        value = body.get(name, default)
        if value is ...:
            raise Refused(422, f"missing field {name!r}")
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                  else (kind,))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise Refused(422, f"field {name!r} must be {names}")
        return value

    def b64(body: dict[str, Any], name: str, required: bool = True) -> bytes | None:
        value = field(body, name, str, ... if required else "")
        try:
            return base64.b64decode(value, validate=True) if value else None
        except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
            raise Refused(400, f"{name} is not valid base64") from None

    @app.get("/adapters", responses=errors(*AUTH))
    def list_adapters(request: Request) -> list[dict[str, Any]]:
        return registry.list(who(request))

    @app.post("/adapters", responses=errors(*AUTH, *BODY), openapi_extra=json_body(BODIES["push"]))
    async def push(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await read_json(request)
        files = field(body, "files", dict, {})
        if not all(isinstance(v, str) for v in files.values()):
            raise Refused(422, "field 'files' maps file names to their text")
        return registry.push(principal, b64(body, "weights_b64") or b"", name=field(body, "name", str),
                             config=field(body, "config", dict), privacy=field(body, "privacy", dict, {}),
                             audit=field(body, "audit", dict, {}),
                             files={k: v.encode() for k, v in files.items()})

    @app.get("/adapters/{adapter_id}", responses=errors(*AUTH, 404))
    def show(adapter_id: str, request: Request) -> dict[str, Any]:
        return registry.show(who(request), adapter_id)

    @app.get("/adapters/{adapter_id}/weights", responses=errors(*AUTH, 404))
    def pull(adapter_id: str, request: Request, fmt: str | None = FORMAT) -> Response:
        _, weights = registry.pull(who(request), adapter_id, fmt)
        return Response(weights, media_type="application/octet-stream")

    @app.get("/adapters/{adapter_id}/files/{name}", responses=errors(*AUTH, 404))
    def adapter_file(adapter_id: str, name: str, request: Request) -> Response:
        return Response(registry.adapter_file(who(request), adapter_id, name), media_type="text/plain")

    @app.post("/adapters/{adapter_id}/audit", responses=errors(*AUTH, *BODY, 404),
              openapi_extra=json_body(BODIES["audit"]))
    async def attach_audit(adapter_id: str, request: Request) -> dict[str, Any]:
        principal = who(request)
        return registry.attach_audit(principal, adapter_id, await read_json(request))

    @app.post("/exports", responses=errors(*AUTH, *BODY, 404), openapi_extra=json_body(BODIES["export"]))
    async def request_export(request: Request) -> dict[str, Any]:
        principal = who(request)
        return registry.request_export(principal, field(await read_json(request), "adapter", str))

    @app.post("/exports/{export_id}/approve", responses=errors(*AUTH, 404, 409, 422))
    def approve(export_id: int, request: Request) -> dict[str, Any]:
        return registry.approve_export(who(request), export_id)

    @app.get("/exports/{export_id}/download", responses=errors(*AUTH, 404, 409, 422))
    def download(export_id: int, request: Request, fmt: str | None = FORMAT) -> Response:
        return Response(registry.download_export(who(request), export_id, fmt),
                        media_type="application/octet-stream")

    @app.get("/users", responses=errors(*AUTH))
    def users(request: Request) -> list[dict[str, Any]]:
        return registry.list_users(who(request))

    @app.post("/users", responses=errors(*AUTH, *BODY, 409), openapi_extra=json_body(BODIES["user"]))
    async def add_user(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await read_json(request)
        name, role = field(body, "name", str), field(body, "role", str)
        days = field(body, "expires_days", (int, float), None) if body.get("expires_days") is not None else None
        return {"name": name, "role": role, "token": registry.add_user(principal, name, role, days)}

    @app.post("/users/{name}/revoke", responses=errors(*AUTH, 404))
    def revoke_user(name: str, request: Request) -> dict[str, Any]:
        return registry.revoke_user(who(request), name)

    @app.post("/incidents", responses=errors(*AUTH, *BODY, 404), openapi_extra=json_body(BODIES["incident"]))
    async def open_incident(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await read_json(request)
        return registry.open_incident(principal, field(body, "adapter", str), field(body, "reason", str))

    @app.get("/incidents", responses=errors(*AUTH))
    def list_incidents(request: Request) -> list[dict[str, Any]]:
        return registry.list_incidents(who(request))

    @app.get("/incidents/{incident_id}", responses=errors(*AUTH, 404, 422))
    def show_incident(incident_id: int, request: Request) -> dict[str, Any]:
        return registry.show_incident(who(request), incident_id)

    @app.post("/incidents/{incident_id}/report", responses=errors(*AUTH, *BODY, 404, 409),
              openapi_extra=json_body(BODIES["report"]))
    async def report_incident(incident_id: int, request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await read_json(request)
        return registry.report_incident(principal, incident_id, status=field(body, "status", str),
                                        report=field(body, "report", dict))

    @app.post("/incidents/{incident_id}/close", responses=errors(*AUTH, *BODY, 404),
              openapi_extra=json_body(BODIES["close"]))
    async def close_incident(incident_id: int, request: Request) -> dict[str, Any]:
        principal = who(request)
        return registry.close_incident(principal, incident_id, field(await read_json(request), "resolution", str))

    @app.get("/datasets", responses=errors(*AUTH))
    def list_datasets(request: Request) -> list[dict[str, Any]]:
        return registry.list_datasets(who(request))

    @app.post("/datasets", responses=errors(*AUTH, *BODY), openapi_extra=json_body(BODIES["dataset"]))
    async def push_dataset(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await read_json(request)
        return registry.push_dataset(principal, b64(body, "data_b64") or b"", name=field(body, "name", str),
                                     kind=field(body, "kind", str), fmt=field(body, "format", str, "file"))

    @app.get("/datasets/{dataset_id}/data", responses=errors(*AUTH, 404))
    def pull_dataset(dataset_id: str, request: Request) -> Response:
        dataset, data = registry.pull_dataset(who(request), dataset_id)
        return Response(data, media_type="application/octet-stream",
                        headers={"X-Dataset-Format": dataset.get("format") or "file"})

    @app.get("/generations", responses=errors(*AUTH))
    def generations(request: Request) -> list[dict[str, Any]]:
        return registry.generation_logs(who(request))

    @app.post("/generations", responses=errors(*AUTH, *BODY, 404), openapi_extra=json_body(BODIES["generation"]))
    async def log_generation(request: Request) -> dict[str, Any]:
        principal = who(request)
        body = await read_json(request)
        return registry.log_generation(principal, adapter=field(body, "adapter", str),
                                       prompt=field(body, "prompt", str), params=field(body, "params", dict, {}),
                                       image=b64(body, "image_b64", False))

    @app.get("/log", responses=errors(*AUTH))
    def read_log(request: Request) -> list[dict[str, Any]]:
        return registry.log(who(request))

    @app.get("/log/verify", responses=errors(*AUTH, 422))
    def verify_log(request: Request, expect_head: str | None = None) -> dict[str, Any]:
        return registry.verify_log(who(request), expect_head)

    return app
