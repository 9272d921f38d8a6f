"""Tasks: a base model plus LoRA for one modality, behind the one small protocol in :mod:`.base`."""

from privlora.tasks.base import Task

__all__ = ["Task"]
