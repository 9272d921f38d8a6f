"""privlora's optional parts and the pip extra that installs each (pyproject.toml's optional-dependencies).

Why extras: ``pip install privlora`` is what a data owner needs to sanitize, train and audit on one machine.
The HTTP servers (FastAPI, uvicorn), Flower and Ray, the PostgreSQL driver and MLflow are large and only some
teams run them, so they are extras; code that needs one says which, in one line, instead of a traceback
ending in ``ModuleNotFoundError: No module named 'flwr'``. Stdlib only: the CLI imports it at start-up.
"""

from __future__ import annotations

import importlib.util

from privlora.errors import UserError

#: extra → (what it is for, the top-level modules it installs that privlora imports)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "registry": ("the adapter registry (privlora registry / incident)",
                 ("fastapi", "starlette", "uvicorn", "httpx", "sqlalchemy", "cryptography")),
    "split": ("split learning's server and client (privlora split)", ("fastapi", "starlette", "uvicorn", "httpx")),
    "federated": ("federated training on Flower and reference adapters on Ray (privlora federate, audit --ray-address)",
                  ("flwr", "ray")),
    "postgres": ("a PostgreSQL registry database (postgresql+psycopg://…)", ("psycopg",)),
    "mlflow": ("train --report-to mlflow", ("mlflow",)),
}


def _install(extras: list[str]) -> str:
    return " or ".join(f"pip install 'privlora[{name}]'" for name in extras)


def require(extra: str, *modules: str) -> None:
    """Refuse, naming the extra, when ``modules`` (default: all of the extra's) are not installed; checked
    without importing them, so it costs a directory look-up, not Flower's or FastAPI's import time."""
    what, everything = EXTRAS[extra]
    missing = [m for m in modules or everything if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{what} needs privlora's '{extra}' extra ({', '.join(missing)} not installed): "
                        f"{_install([extra])}")


def missing_extra(error: ModuleNotFoundError) -> UserError | None:
    """The one-line error for an import that failed because an extra is not installed (None: not an extra's)."""
    top = (error.name or "").split(".")[0]
    extras = [name for name, (_, modules) in EXTRAS.items() if top in modules]
    if not extras:
        return None
    return UserError(f"{top} is not installed; it comes with privlora's {' / '.join(repr(e) for e in extras)} "
                     f"extra: {_install(extras)}")
