"""The user's connection to a split server: the same endpoint methods as :class:`~privlora.split.service.LocalTop`.

Only privatized hidden states, the attention mask and the gradient of the loss w.r.t. the logits are
sent; texts, token ids and labels stay on the user's machine. Server refusals and network failures
become one-line :class:`UserError`s.
"""

from __future__ import annotations

from typing import Any

import torch

from privlora.errors import UserError
from privlora.httpapi import refusal_reason
from privlora.split.wire import Expect, WireError, pack, unpack


class HttpTop:
    """``forward``/``backward``/``info``/``save`` against ``privlora split serve`` over HTTP."""

    def __init__(self, url: str, token: str, *, timeout: float = 120.0, task: str = "text") -> None:
        """``task``: what the server's top returns — ``text``: logits ``[B, num_labels]``; ``causal-lm``:
        hidden states ``[B, T, H]`` of the same shape as the ones sent."""
        import httpx

        if not token:
            raise UserError("the split server needs a token: pass --token or set PRIVLORA_SPLIT_TOKEN")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"})
        self.task = task
        self.bytes_sent = 0
        self.bytes_received = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpTop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise UserError(f"cannot reach the split server at {self.url} ({type(e).__name__}: {e}); "
                            "is `privlora split serve` running?") from None
        self.bytes_sent += len(kwargs.get("content", b""))
        self.bytes_received += len(response.content)
        if response.status_code >= 400:
            reason = refusal_reason(response)
            raise UserError(f"split server refused {path} ({response.status_code}): {reason}")
        return response

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/info").json()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, train: bool,
                want_input_grad: bool = False) -> tuple[str | None, torch.Tensor]:
        body = pack({"hidden": hidden.detach().float(), "attention_mask": attention_mask.to(torch.int64)})
        response = self._request("POST", "/forward", content=body,
                                 params={"train": int(train), "input_grad": int(want_input_grad)},
                                 headers={"Content-Type": "application/octet-stream"})
        shape = tuple(hidden.shape) if self.task == "causal-lm" else (hidden.shape[0], None)
        logits = self._unpack(response.content, {"logits": Expect(("F32",), shape)})["logits"]
        return response.headers.get("X-Privlora-Step"), logits

    def backward(self, step_id: str, grad_logits: torch.Tensor) -> torch.Tensor | None:
        response = self._request("POST", "/backward", params={"step": step_id},
                                 content=pack({"grad_logits": grad_logits.detach().float()}),
                                 headers={"Content-Type": "application/octet-stream"})
        if response.status_code == 204:
            return None
        return self._unpack(response.content, {"grad_hidden": Expect(("F32",), (None, None, None))})["grad_hidden"]

    def save(self) -> dict[str, Any]:
        return self._request("POST", "/save").json()

    def _unpack(self, data: bytes, expect: dict[str, Expect]) -> dict[str, torch.Tensor]:
        try:
            return unpack(data, expect)
        except WireError as e:
            raise UserError(f"the split server sent a malformed answer: {e.message}") from None
