"""The registry's HTTP client for the CLI: one method per route; refusals become one-line UserErrors."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from privlora.errors import UserError
from privlora.httpapi import refusal_reason

TOKEN_ENV, URL_ENV = "PRIVLORA_REGISTRY_TOKEN", "PRIVLORA_REGISTRY_URL"


class RegistryClient:
    def __init__(self, url: str, token: str, *, timeout: float = 120.0) -> None:
        import httpx

        if not token:
            raise UserError(f"the registry needs your token: --token or {TOKEN_ENV}")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {token}"})

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise UserError(f"cannot reach the registry at {self.url} ({type(e).__name__}); is "
                            "`privlora registry serve` running?") from None
        if response.status_code >= 400:
            reason = refusal_reason(response)
            raise UserError(f"registry refused {method} {path} ({response.status_code}): {reason}")
        return response

    def push(self, adapter_dir: Path, name: str | None = None) -> dict[str, Any]:
        """Push a peft adapter folder (or a run folder with adapter/), with privacy.json and audit results."""
        from privlora.audit.spectrum import resolve_adapter_dir

        folder = resolve_adapter_dir(Path(adapter_dir))
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise UserError(f"{folder} has no adapter_model.safetensors (pickle adapters are refused)")
        run = folder.parent if folder.name == "adapter" else folder

        def read(path: Path) -> dict[str, Any]:
            if not path.is_file():
                return {}
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                raise UserError(f"{path} is not valid JSON") from None

        body = {"name": name or run.name, "weights_b64": base64.b64encode(weights.read_bytes()).decode(),
                "config": read(folder / "adapter_config.json"), "privacy": read(run / "privacy.json"),
                "audit": read(run / "audit" / "results.json")}
        return self._call("POST", "/adapters", json=body).json()

    def get(self, path: str) -> Any:
        return self._call("GET", path).json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, json=body or {}).json()

    def download(self, path: str, out: Path) -> Path:
        from privlora.runs import atomic_file

        data = self._call("GET", path).content
        with atomic_file(out) as tmp:
            tmp.write_bytes(data)
        return out
