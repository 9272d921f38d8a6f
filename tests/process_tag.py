"""Find the processes a test started, by a tag in their environment: a process-wide scan by name would also
see the SuperNodes of a test running at the same time in another pytest-xdist worker."""

from __future__ import annotations

import uuid

import psutil

TAG_VAR = "PRIVLORA_TEST_TAG"


def new_tag() -> str:
    return uuid.uuid4().hex


def tagged_alive(tag: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``tag``; children inherit it."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(TAG_VAR) == tag:
                found.append(p)
        except psutil.Error:
            continue
    return found
