"""What travels and how it is merged, per federated LoRA rule: FedIT, FFA-LoRA and FLoRA.

A rule answers four questions, so the Flower client and strategy stay rule-agnostic:

* the **global state** the server keeps and sends down (a flat list of float32 arrays);
* how a client **loads** that state into its model and which tensors it then trains;
* what a client **uploads** (always a *difference* to what it received, or fresh factors for FLoRA:
  small, centred values that clip, noise and quantise well);
* how the server **merges** the weighted uploads into the next global state.

Layouts (``L`` LoRA layers in sorted module-name order, then the classification head — ``head`` arrays:
2 for text, 0 for a causal LM, whose head is frozen and never travels):

=========  ======================================  =====================================
rule       global state                            client upload
=========  ======================================  =====================================
fedit      ``A_1..A_L, B_1..B_L, W_head, b_head``  ``ΔA_1..ΔA_L, ΔB_1..ΔB_L, ΔW_h, Δb_h``
ffa        same                                    ``ΔB_1..ΔB_L, ΔW_h, Δb_h`` (A frozen)
flora      ``ΔW_1..ΔW_L, W_head, b_head`` (dense)  ``A_1..A_L, B_1..B_L, ΔW_h, Δb_h``
=========  ======================================  =====================================

The weighted mean of the uploads is what FedIT/FFA need (``sum_based``: SecAgg+ can compute it without
the server seeing any single upload). FLoRA stacks per-client factors (:func:`aggregation.flora`) —
a concatenation, which no summing protocol can hide, so it refuses secure aggregation. Its global
state is the merged dense ``ΔW`` per layer (clients add it to their frozen base and start fresh LoRA
factors of their own rank every round, as in the FLoRA paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from privlora.errors import UserError
from privlora.federated import aggregation

ADAPTER = "default"


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """The model's LoRA-wrapped layers in a fixed (sorted-name) order: the wire layout's order."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
    if not layers:
        raise UserError("the model carries no LoRA layers to federate")
    return sorted(layers, key=lambda item: item[0])


def _head(model: nn.Module) -> nn.Linear:
    return model.classifier


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy().copy()


def head_arrays(model: nn.Module, head: int = 2) -> list[np.ndarray]:
    """The trained head's weight and bias (``head`` = 2), or nothing (``head`` = 0: a frozen LM head)."""
    if not head:
        return []
    h = _head(model)
    return [_np(h.weight), _np(h.bias)]


@torch.no_grad()
def set_head(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    if not len(arrays):
        return  # no trained head (causal LM)
    h = _head(model)
    h.weight.copy_(torch.from_numpy(np.asarray(arrays[0])))
    h.bias.copy_(torch.from_numpy(np.asarray(arrays[1])))


@dataclass(frozen=True)
class ClientState:
    """What a client holds after loading the global state: the arrays it will diff against."""

    received: list[np.ndarray]


class Rule:
    """Base: FedAvg of uploaded differences on top of the global state (FedIT)."""

    name = "fedit"
    sum_based = True  # the merge needs only the weighted mean of uploads (SecAgg+ can compute it)

    def __init__(self, alpha: float = 16.0, head: int = 2) -> None:
        self.alpha = alpha  # LoRA scaling numerator: a layer's change is (alpha / r) · B A
        self.head = head  # arrays after the LoRA factors: 2 (a classifier's W, b) or 0 (causal LM)

    def layers_in(self, state: Sequence[np.ndarray]) -> int:
        """How many LoRA layers a FedIT/FFA state of this layout holds."""
        return (len(state) - self.head) // 2

    # --- server side ---------------------------------------------------------------------------------
    def initial_state(self, model: nn.Module) -> list[np.ndarray]:
        layers = lora_layers(model)
        return ([_np(m.lora_A[ADAPTER].weight) for _, m in layers]
                + [_np(m.lora_B[ADAPTER].weight) for _, m in layers] + head_arrays(model, self.head))

    def upload_shapes(self, state: Sequence[np.ndarray],
                      upload: Sequence[np.ndarray] | None = None) -> list[tuple[int, ...]]:
        """The shapes a valid upload has. ``upload`` matters only where clients choose their own rank
        (FLoRA reads it from the upload's first A)."""
        return [tuple(a.shape) for a in state]

    def merge(self, state: Sequence[np.ndarray], uploads: Sequence[Sequence[np.ndarray]],
              p: torch.Tensor) -> list[np.ndarray]:
        """New state from per-client uploads with weights ``p`` (sum 1)."""
        return self.apply_mean(state, weighted_mean(uploads, p))

    def apply_mean(self, state: Sequence[np.ndarray], mean: Sequence[np.ndarray]) -> list[np.ndarray]:
        """New state from the weighted mean of the uploads (all SecAgg+ reveals)."""
        return [(s + d).astype(np.float32) for s, d in zip(state, mean, strict=True)]

    def rank_of(self, state: Sequence[np.ndarray]) -> int:
        return int(state[0].shape[0])

    def resize(self, state: Sequence[np.ndarray], rank: int, *, seed: int) -> list[np.ndarray]:
        """Change the adapter's rank between rounds. Growing keeps ``BA`` (new A rows random, new B
        columns zero); shrinking keeps the best rank-``rank`` approximation of ``BA`` (truncated SVD,
        split as ``B = U√S``, ``A = √S Vᵀ``)."""
        n = self.layers_in(state)
        As, Bs, head = list(state[:n]), list(state[n:2 * n]), list(state[2 * n:])
        current = As[0].shape[0]
        if rank == current:
            return list(state)
        gen = np.random.default_rng(seed)
        new_A, new_B = [], []
        for A, B in zip(As, Bs, strict=True):
            if rank > current:
                extra = gen.normal(0.0, 1.0 / rank, size=(rank - current, A.shape[1])).astype(np.float32)
                new_A.append(np.concatenate([A, extra], axis=0))
                new_B.append(np.concatenate([B, np.zeros((B.shape[0], rank - current), np.float32)], axis=1))
            else:
                U, S, Vt = np.linalg.svd(B.astype(np.float64) @ A.astype(np.float64), full_matrices=False)
                root = np.sqrt(S[:rank])
                new_B.append((U[:, :rank] * root).astype(np.float32))
                new_A.append((root[:, None] * Vt[:rank]).astype(np.float32))
        keep = rank / current  # the scaling alpha/r changes with r: rescale B so (alpha/r')·B'A' = (alpha/r)·BA
        return new_A + [(b * keep).astype(np.float32) for b in new_B] + head

    # --- client side ---------------------------------------------------------------------------------
    @torch.no_grad()
    def load(self, model: nn.Module, state: Sequence[np.ndarray]) -> ClientState:
        layers = lora_layers(model)
        n = len(layers)
        if len(state) != 2 * n + self.head:
            raise UserError(f"global state has {len(state)} arrays, the model needs {2 * n + self.head}")
        for k, (_, m) in enumerate(layers):
            m.lora_A[ADAPTER].weight.copy_(torch.from_numpy(state[k]))
            m.lora_B[ADAPTER].weight.copy_(torch.from_numpy(state[n + k]))
            m.lora_A[ADAPTER].weight.requires_grad_(self.trains_A)
            m.lora_B[ADAPTER].weight.requires_grad_(True)
        set_head(model, state[2 * n:])
        return ClientState([np.asarray(a, dtype=np.float32).copy() for a in state])

    trains_A = True

    def upload(self, model: nn.Module, held: ClientState) -> list[np.ndarray]:
        now = self.initial_state(model)
        return [(a - b).astype(np.float32) for a, b in zip(now, held.received, strict=True)]

    def adapter_factors(self, state: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(As, Bs) of the global adapter, for saving it and for the server's evaluation model."""
        n = self.layers_in(state)
        return list(state[:n]), list(state[n:2 * n])


class FFA(Rule):
    """FFA-LoRA: A stays at its seeded initial value; only B (and the head) train and travel up."""

    name = "ffa"
    trains_A = False

    def upload_shapes(self, state: Sequence[np.ndarray],
                      upload: Sequence[np.ndarray] | None = None) -> list[tuple[int, ...]]:
        n = self.layers_in(state)
        return [tuple(a.shape) for a in state[n:]]

    def apply_mean(self, state: Sequence[np.ndarray], mean: Sequence[np.ndarray]) -> list[np.ndarray]:
        n = self.layers_in(state)
        return list(state[:n]) + [(s + d).astype(np.float32) for s, d in zip(state[n:], mean, strict=True)]

    def upload(self, model: nn.Module, held: ClientState) -> list[np.ndarray]:
        n = self.layers_in(held.received)
        return super().upload(model, held)[n:]


class FLoRA(Rule):
    """FLoRA: fresh factors per client and round, stacked on the server and merged into a dense ΔW."""

    name = "flora"
    sum_based = False

    def initial_state(self, model: nn.Module) -> list[np.ndarray]:
        return [np.zeros(tuple(m.base_layer.weight.shape), np.float32) for _, m in lora_layers(model)] \
            + head_arrays(model, self.head)

    def upload_shapes(self, state: Sequence[np.ndarray],
                      upload: Sequence[np.ndarray] | None = None) -> list[tuple[int, ...]]:
        n = len(state) - self.head
        r = int(upload[0].shape[0]) if upload and np.ndim(upload[0]) == 2 else 1
        return ([(r, d.shape[1]) for d in state[:n]] + [(d.shape[0], r) for d in state[:n]]
                + [tuple(a.shape) for a in state[n:]])

    def merge(self, state: Sequence[np.ndarray], uploads: Sequence[Sequence[np.ndarray]],
              p: torch.Tensor) -> list[np.ndarray]:
        n = len(state) - self.head
        new = []
        for k in range(n):
            As = [torch.from_numpy(np.asarray(u[k])) for u in uploads]
            Bs = [torch.from_numpy(np.asarray(u[n + k])) for u in uploads]
            scalings = [self.alpha / a.shape[0] for a in As]
            A, B = aggregation.flora(As, Bs, p, scalings)
            new.append((state[k] + (B.double() @ A.double()).numpy()).astype(np.float32))
        heads = weighted_mean([list(u[2 * n:]) for u in uploads], p)
        return new + [(s + d).astype(np.float32) for s, d in zip(state[n:], heads, strict=True)]

    def apply_mean(self, state: Sequence[np.ndarray], mean: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise UserError("FLoRA stacks each client's factors; it cannot work from a securely summed update")

    def rank_of(self, state: Sequence[np.ndarray]) -> int:
        return 0

    def resize(self, state: Sequence[np.ndarray], rank: int, *, seed: int) -> list[np.ndarray]:
        return list(state)  # clients pick their rank every round; the dense ΔW has none

    @torch.no_grad()
    def load(self, model: nn.Module, state: Sequence[np.ndarray], *, seed: int = 0) -> ClientState:
        layers = lora_layers(model)
        n = len(layers)
        if len(state) != n + self.head:
            raise UserError(f"global state has {len(state)} arrays, the model needs {n + self.head}")
        gen = torch.Generator().manual_seed(seed)
        for k, (_, m) in enumerate(layers):
            base = m.base_layer.weight
            if not hasattr(m, "_privlora_w0"):
                m._privlora_w0 = base.detach().clone()  # the frozen pre-trained weight, kept once
            base.copy_(m._privlora_w0 + torch.from_numpy(state[k]))
            A = m.lora_A[ADAPTER].weight
            A.copy_(torch.randn(A.shape, generator=gen) / A.shape[0])  # peft's gaussian init: N(0, 1/r)
            m.lora_B[ADAPTER].weight.zero_()
            A.requires_grad_(True)
            m.lora_B[ADAPTER].weight.requires_grad_(True)
        set_head(model, state[n:])
        return ClientState([np.asarray(a, dtype=np.float32).copy() for a in state[n:]])

    def upload(self, model: nn.Module, held: ClientState) -> list[np.ndarray]:
        layers = lora_layers(model)
        As = [_np(m.lora_A[ADAPTER].weight) for _, m in layers]
        Bs = [_np(m.lora_B[ADAPTER].weight) for _, m in layers]
        heads = [(a - b).astype(np.float32) for a, b in zip(head_arrays(model, self.head), held.received,
                                                                 strict=True)]
        return As + Bs + heads

    def adapter_factors(self, state: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The dense ΔW as exact LoRA factors: SVD at the largest numerical rank over layers (scaling
        folded in by the caller's ``alpha/r``)."""
        n = len(state) - self.head
        svds = [np.linalg.svd(state[k].astype(np.float64), full_matrices=False) for k in range(n)]
        tol = max(float(S[0]) if S.size else 0.0 for _, S, _ in svds) * 1e-6
        rank = max(1, max(int((S > tol).sum()) for _, S, _ in svds))
        As, Bs = [], []
        for U, S, Vt in svds:
            root = np.sqrt(S[:rank])
            Bs.append((U[:, :rank] * root).astype(np.float32))
            As.append((root[:, None] * Vt[:rank]).astype(np.float32))
        return As, Bs


RULES: dict[str, type[Rule]] = {"fedit": Rule, "ffa": FFA, "flora": FLoRA}


def get_rule(name: str, alpha: float = 16.0, head: int = 2) -> Rule:
    """``head``: arrays after the LoRA factors (2: a classifier's weight and bias; 0: none, causal LM)."""
    try:
        return RULES[name](alpha, head)
    except KeyError:
        raise UserError(f"unknown federated strategy {name!r}; known: {', '.join(RULES)}") from None


def weighted_mean(uploads: Sequence[Sequence[np.ndarray]], p: torch.Tensor) -> list[np.ndarray]:
    """``Σ p_i u_i`` per array, in float64 then float32."""
    weights = [float(x) for x in p]
    return [sum(w * np.asarray(u[k], np.float64) for w, u in zip(weights, uploads, strict=True)).astype(np.float32)
            for k in range(len(uploads[0]))]
