"""The registry's HTTP client for the CLI: one method per route; refusals become one-line UserErrors."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from privlora.errors import UserError
from privlora.httpapi import refusal_reason

TOKEN_ENV, URL_ENV = "PRIVLORA_REGISTRY_TOKEN", "PRIVLORA_REGISTRY_URL"
RUN_FILES = ("config.yaml", "splits.json")  # pushed with a run's adapter so that it can be re-audited


class RegistryRefusal(UserError):
    """A 4xx/5xx answer from the registry (``status`` tells 403 from 404 for callers that care)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def pack_folder(folder: Path) -> bytes:
    """A folder as an uncompressed tar with fixed metadata: the same files give the same bytes (and the
    same content-addressed id), whoever packs them and when."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with path.open("rb") as f:
                tar.addfile(info, f)
    return buffer.getvalue()


def unpack_folder(data: bytes, out: Path) -> None:
    """Unpack a dataset tar into a new folder ``out`` (atomically; tarfile's 'data' filter refuses
    absolute paths, '..', links out of the folder and device files)."""
    from privlora.runs import atomic_dir

    try:
        with atomic_dir(out) as tmp, tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot unpack the dataset into {out}: {e}") from None


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
            raise RegistryRefusal(f"registry refused {method} {path} ({response.status_code}): {reason}",
                                  response.status_code)
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
                "audit": read(run / "audit" / "results.json"),
                "files": {f: (run / f).read_text() for f in RUN_FILES if (run / f).is_file()}}
        return self._call("POST", "/adapters", json=body).json()

    def push_dataset(self, path: Path, *, name: str | None, kind: str) -> dict[str, Any]:
        """Upload a file as it is, or a folder packed as a tar (unpacked again by :meth:`pull_dataset`)."""
        path = Path(path)
        if path.is_dir():
            data, fmt = pack_folder(path), "tar"
        elif path.is_file():
            data, fmt = path.read_bytes(), "file"
        else:
            raise UserError(f"{path} does not exist (give a data file or folder)")
        if not data or (fmt == "tar" and not any(p.is_file() for p in path.rglob("*"))):
            raise UserError(f"{path} is empty: nothing to upload")
        body = {"name": name or path.name, "kind": kind, "format": fmt,
                "data_b64": base64.b64encode(data).decode()}
        return self._call("POST", "/datasets", json=body).json()

    def pull_dataset(self, dataset_id: str, out: Path) -> Path:
        """Write a dataset version to ``out``: the file, or the folder it was pushed as."""
        from privlora.runs import atomic_file

        response = self._call("GET", f"/datasets/{dataset_id}/data")
        if response.headers.get("x-dataset-format") == "tar":
            if Path(out).exists():
                raise UserError(f"{out} exists; give a new folder for the dataset")
            unpack_folder(response.content, Path(out))
        else:
            with atomic_file(out) as tmp:
                tmp.write_bytes(response.content)
        return Path(out)

    def log_generation(self, *, adapter: str, prompt: str, params: dict[str, Any], image: Path | None
                       ) -> dict[str, Any]:
        body: dict[str, Any] = {"adapter": adapter, "prompt": prompt, "params": params}
        if image is not None:
            if not Path(image).is_file():
                raise UserError(f"image {image} does not exist")
            body["image_b64"] = base64.b64encode(Path(image).read_bytes()).decode()
        return self._call("POST", "/generations", json=body).json()

    def text(self, path: str) -> str:
        return self._call("GET", path).text

    def content(self, path: str) -> bytes:
        return self._call("GET", path).content

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._call("GET", path, params=params).json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, json=body or {}).json()

    def download(self, path: str, out: Path) -> Path:
        from privlora.runs import atomic_file

        data = self._call("GET", path).content
        with atomic_file(out) as tmp:
            tmp.write_bytes(data)
        return out
