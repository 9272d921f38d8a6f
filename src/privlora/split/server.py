"""``privlora split serve``: the provider's HTTP server around :class:`TopService` (FastAPI + uvicorn).

Endpoints (all but ``/health`` need ``Authorization: Bearer <token>``):

* ``GET /health`` → ``{"status": "ok"}`` (for load balancers; says nothing about the model)
* ``GET /info`` → base, split depth, hidden size, number of labels, limits, steps so far
* ``POST /forward?train=0|1&input_grad=0|1`` — body: safetensors ``hidden [B,T,H]`` (privatized by the user)
  + ``attention_mask [B,T]`` → safetensors ``logits [B,C]``; with ``train=1`` the ``X-Privlora-Step`` header
  names the step the backward must quote
* ``POST /backward?step=ID`` — body: safetensors ``grad_logits [B,C]`` → the server back-propagates into its
  LoRA and steps; answers safetensors ``grad_hidden`` when the forward asked for ``input_grad`` (a trainable
  bottom), else 204
* ``POST /save`` → writes the adapter to the server's ``--out`` folder
* ``GET /openapi.json`` → the schema, generated from these routes (each declares its body and refusals)

Every refusal is a 4xx with ``{"error": "<one line>"}``; the server stays up. The token is compared in
constant time and never logged (uvicorn's access log prints method, path and status only).
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from privlora.httpapi import bearer, binary_body, errors, read_body, service_app
from privlora.split.service import TopService
from privlora.split.wire import WireError, pack, unpack

TOKEN_ENV = "PRIVLORA_SPLIT_TOKEN"
DEFAULT_MAX_BODY = 16 * 1024 * 1024  # 64 texts × 128 tokens × 384 floats × 4 B = 12.6 MB
log = logging.getLogger("privlora.split")


def create_app(service: TopService, token: str, *, out: Path | None = None,
               max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The FastAPI app; ``token`` is required of every call but ``/health``."""
    if not token:
        raise ValueError("the split server needs a token")
    app = service_app("privlora split server", log)
    expected = token.encode()

    def authorize(request: Request) -> None:
        if not hmac.compare_digest(bearer(request).encode(), expected):
            raise WireError(401, "missing or wrong bearer token")

    async def body(request: Request) -> bytes:
        return await read_body(request, max_body)

    def flag(request: Request, name: str) -> bool:
        value = request.query_params.get(name, "0")
        if value not in ("0", "1", "true", "false"):
            raise WireError(422, f"query parameter {name!r} must be 0 or 1")
        return value in ("1", "true")

    flags = [{"name": n, "in": "query", "required": False, "schema": {"type": "string", "enum": ["0", "1", "true",
                                                                                               "false"]}}
             for n in ("train", "input_grad")]
    step = [{"name": "step", "in": "query", "required": True, "schema": {"type": "string"}}]

    @app.get("/info", responses=errors(401))
    def info(request: Request) -> dict[str, Any]:
        authorize(request)
        return service.info()

    @app.post("/forward", responses=errors(400, 401, 413, 422, 503),
              openapi_extra={**binary_body(), "parameters": flags})
    async def forward(request: Request) -> Response:
        authorize(request)
        train, input_grad = flag(request, "train"), flag(request, "input_grad")
        hidden, mask = service.check_forward(unpack(await body(request), service.forward_spec()))
        step_id, logits = await run_in_threadpool(service.forward, hidden, mask, train=train,
                                                  want_input_grad=input_grad)
        headers = {"X-Privlora-Step": step_id} if step_id else {}
        return Response(pack({"logits": logits}), media_type="application/octet-stream", headers=headers)

    @app.post("/backward", responses=errors(400, 401, 409, 413, 422),
              openapi_extra={**binary_body(), "parameters": step})
    async def backward(request: Request) -> Response:
        authorize(request)
        step_id = request.query_params.get("step", "")
        batch = service.pending_batch(step_id)
        grad = unpack(await body(request), service.backward_spec(batch))["grad_logits"]
        grad_hidden = await run_in_threadpool(service.backward, step_id, grad)
        if grad_hidden is None:
            return Response(status_code=204)
        return Response(pack({"grad_hidden": grad_hidden}), media_type="application/octet-stream")

    @app.post("/save", responses=errors(401, 409))
    def save(request: Request) -> dict[str, Any]:
        authorize(request)
        if out is None:
            raise WireError(409, "this server was started without --out: nowhere to save the adapter")
        return service.save(out)

    return app


def serve(service: TopService, token: str, *, host: str = "127.0.0.1", port: int = 8765, out: Path | None = None,
          max_body: int = DEFAULT_MAX_BODY, log_level: str = "warning") -> None:
    """Run until Ctrl-C / SIGTERM; on shutdown save the adapter (if ``out`` and any step was taken).

    The save is a shutdown handler, not code after ``uvicorn.run``: uvicorn re-raises the signal it caught
    once it has shut down, so nothing after ``run`` executes on SIGTERM.
    """
    import sys

    import uvicorn

    app = create_app(service, token, out=out, max_body=max_body)

    def save_on_shutdown() -> None:
        if out is not None and service.steps:
            service.save(out)
            print(f"saved the adapter ({service.steps} steps) to {out}", file=sys.stderr, flush=True)

    app.router.add_event_handler("shutdown", save_on_shutdown)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level in ("info", "debug"))
