"""The provider's side of SAP as plain Python: the top model, its optimiser and the step protocol.

The HTTP server (:mod:`privlora.split.server`) is a thin shell around :class:`TopService`; the sweep and
the throughput benchmark call the same object in-process through :class:`LocalTop`, so "over HTTP" and
"in one process" run exactly the same code apart from the transport.

One adapter is trained by every client of a server, so steps are sequential: a training ``forward``
takes the *step lease* (its graph is kept for the matching ``backward``), and the next training
``forward`` waits until that ``backward`` has stepped the optimiser — otherwise a second client's update
would change the weights under the first one's saved graph. A lease a client abandoned expires after
``lease_timeout`` seconds. Inference forwards (``train=False``) never wait for a lease.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from privlora.split.models import SplitTop
from privlora.split.wire import Expect, WireError


@dataclass
class _Pending:
    step_id: str
    hidden: torch.Tensor
    logits: torch.Tensor
    created: float = field(default_factory=time.monotonic)


class TopService:
    """Holds the top model (a text :class:`~privlora.split.models.SplitTop` or a causal LM's
    :class:`~privlora.split.lm_models.LMSplitTop`); validates shapes; runs forward/backward/step; saves
    the adapter."""

    def __init__(self, top: SplitTop, *, lr: float = 1e-3, max_batch: int = 64, max_tokens: int | None = None,
                 lease_timeout: float = 60.0, lease_wait: float = 30.0, base_name: str = "minilm") -> None:
        """``max_tokens``: the longest text a request may carry (None: the top's own ``max_tokens``, else 128)."""
        self.top, self.max_batch = top, max_batch
        self.max_tokens = int(max_tokens or getattr(top, "max_tokens", 128))
        self.lease_timeout, self.lease_wait, self.base_name = lease_timeout, lease_wait, base_name
        self.optimizer = torch.optim.AdamW(top.trainable_parameters(), lr=lr)
        self.steps = 0
        self.samples = 0
        self._cond = threading.Condition()
        self._pending: _Pending | None = None
        top.model.train()  # dropout is 0: train mode computes what eval mode does

    # --- what a request may carry ---------------------------------------------------------------------
    def forward_spec(self) -> dict[str, Expect]:
        return {"hidden": Expect(("F32", "F16", "BF16"), (None, None, self.top.hidden_size)),
                "attention_mask": Expect(("I64", "I32", "BOOL", "U8"), (None, None))}

    def backward_spec(self, batch: int) -> dict[str, Expect]:
        """The gradient of what ``forward`` returned: ``[B, num_labels]`` (text) or ``[B, T, H]`` (causal LM)."""
        return {"grad_logits": Expect(("F32",), self.top.output_shape(batch))}

    def check_forward(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = tensors["hidden"], tensors["attention_mask"]
        if tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise WireError(422, f"attention_mask shape {list(mask.shape)} does not match hidden "
                                 f"{list(hidden.shape[:2])}")
        batch, tokens = hidden.shape[:2]
        if not 1 <= batch <= self.max_batch:
            raise WireError(422, f"batch of {batch} outside 1..{self.max_batch}")
        if not 1 <= tokens <= self.max_tokens:
            raise WireError(422, f"{tokens} tokens per text outside 1..{self.max_tokens}")
        mask = mask.to(torch.long)
        if bool(((mask != 0) & (mask != 1)).any()) or bool((mask.sum(dim=1) == 0).any()):
            raise WireError(422, "attention_mask must be 0/1 with at least one 1 per text")
        return hidden, mask

    def info(self) -> dict[str, Any]:
        return {"task": self.top.kind, "base": self.base_name, "depth": self.top.depth,
                "hidden_size": self.top.hidden_size,
                "num_labels": self.top.num_labels, "max_batch": self.max_batch, "max_tokens": self.max_tokens,
                "steps": self.steps, "samples": self.samples}

    # --- the protocol -----------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, train: bool,
                want_input_grad: bool = False) -> tuple[str | None, torch.Tensor]:
        """Logits for privatized hidden states; ``train`` keeps the graph under a new step id."""
        if not train:
            with self._cond, torch.no_grad():
                return None, self.top.forward(hidden, attention_mask)
        with self._cond:
            deadline = time.monotonic() + self.lease_wait
            while self._pending is not None:
                now = time.monotonic()
                expires = self._pending.created + self.lease_timeout
                if now >= expires:
                    self._pending = None  # abandoned by its client
                    break
                if now >= deadline:
                    raise WireError(503, "another client's training step is in progress; retry")
                self._cond.wait(min(deadline, expires) - now)
            leaf = hidden.detach().requires_grad_(want_input_grad)
            logits = self.top.forward(leaf, attention_mask)
            pending = _Pending(secrets.token_hex(12), leaf, logits)
            self._pending = pending
            return pending.step_id, logits.detach()

    def backward(self, step_id: str, grad_logits: torch.Tensor) -> torch.Tensor | None:
        """Back-propagate the user's gradient of the loss w.r.t. the logits, step the optimiser.

        Returns the gradient w.r.t. the hidden states the user sent when its forward asked for it
        (trainable bottom), else ``None``.
        """
        with self._cond:
            pending = self._step(step_id)
            if tuple(grad_logits.shape) != tuple(pending.logits.shape):
                raise WireError(422, f"grad_logits shape {list(grad_logits.shape)} does not match the step's "
                                     f"logits {list(pending.logits.shape)}")
            try:
                self.optimizer.zero_grad(set_to_none=True)
                pending.logits.backward(grad_logits)
                torch.nn.utils.clip_grad_norm_(self.top.trainable_parameters(), 1.0)
                self.optimizer.step()
                self.steps += 1
                self.samples += int(grad_logits.shape[0])
                grad = pending.hidden.grad.detach() if pending.hidden.requires_grad else None
            finally:
                self._pending = None
                self._cond.notify_all()
            return grad

    def pending_batch(self, step_id: str) -> int:
        """Batch size of the step ``step_id`` (to validate its backward request before decoding it)."""
        with self._cond:
            return int(self._step(step_id).logits.shape[0])

    def _step(self, step_id: str) -> _Pending:
        """The step awaiting its backward, if ``step_id`` names it (call with the lock held)."""
        pending = self._pending
        if pending is None or not secrets.compare_digest(pending.step_id, step_id):
            raise WireError(409, "unknown or expired step id (forward with train=1 first; a step "
                                 f"lease lasts {self.lease_timeout:g} s)")
        return pending

    def save(self, path: Path) -> dict[str, Any]:
        """Write the adapter (peft SEQ_CLS folder for the full base model) atomically."""
        from privlora.runs import atomic_dir

        with self._cond, atomic_dir(path) as tmp:
            self.top.save_adapter(tmp)
        return {"path": str(path), "steps": self.steps, "samples": self.samples}


class LocalTop:
    """The transport-free endpoint: the client's loop calls the service directly (sweep, benchmark)."""

    def __init__(self, service: TopService) -> None:
        self.service = service

    def info(self) -> dict[str, Any]:
        return self.service.info()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, train: bool,
                want_input_grad: bool = False) -> tuple[str | None, torch.Tensor]:
        hidden, mask = self.service.check_forward({"hidden": hidden.detach().float(),
                                                   "attention_mask": attention_mask})
        return self.service.forward(hidden, mask, train=train, want_input_grad=want_input_grad)

    def backward(self, step_id: str, grad_logits: torch.Tensor) -> torch.Tensor | None:
        return self.service.backward(step_id, grad_logits.detach().float())

    def save(self) -> dict[str, Any]:
        return {"steps": self.service.steps}
