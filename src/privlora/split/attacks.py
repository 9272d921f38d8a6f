"""Attacks a curious server runs on the hidden states the user's bottom sends (SAP's threat model).

The server is a white-box adversary: it holds the base model's weights, so it can run the user's bottom
itself. Two questions measure how much the (noised) hidden states leak:

* **EIA** — embedding inversion: which tokens did the user type? At depth 0 the observed vector at
  position ``p`` is ``LayerNorm(W[token] + pos[p] + type[0]) + noise``, so :func:`eia_nearest` matches it
  against that exact candidate set. Behind ``depth ≥ 1`` blocks the map is no longer per-token, so
  :func:`eia_optimize` learns a relaxed (softmax over the vocabulary) input whose hidden states match.
  Scored with :func:`token_recovery`.
* **AIA** — attribute inference: can a classifier trained on the attacker's own users read a private
  attribute (here: which airline a tweet addresses) off pooled hidden states of other users?
  :func:`attribute_inference` reports success and chance; :func:`empirical_privacy` is 1 − success.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from privlora.errors import UserError

if TYPE_CHECKING:
    from privlora.split.models import SplitBottom

# Per-position candidate sets are [V, H] (47 MB for MiniLM); the relaxed attack holds ~8 [N, V] float
# tensors (logits, Adam moments, softmax, gradients), so N·V is capped to keep the attack well under 1 GB.
MAX_RELAXED_ELEMENTS = 16_000_000
# The AIA attacker picks its L2 strength by cross-validation on its own users: a fixed weak penalty
# overfits 768 pooled features on a few hundred users and scores *below* chance on uninformative states,
# which would overstate privacy; the strongest setting falls back to predicting the commonest class.
AIA_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def token_recovery(recovered: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   special_ids: frozenset[int]) -> float:
    """Share of the user's real tokens recovered exactly.

    Padding and special tokens ([CLS], [SEP], …) are left out: their ids are known to anyone who knows the
    tokenizer, so counting them would credit an attack with what it never had to find. ``nan`` when no
    token counts (an empty batch has no recovery rate, not a zero one).
    """
    counted = counted_tokens(input_ids, attention_mask, special_ids)
    total = int(counted.sum())
    if total == 0:
        return float("nan")
    return int((recovered.to(input_ids.device) == input_ids)[counted].sum()) / total


def counted_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: frozenset[int]) -> torch.Tensor:
    """The positions an inversion is scored on: real (unpadded), non-special tokens, ``[B, T]`` bool."""
    return attention_mask.bool() & ~torch.isin(input_ids, _ids_tensor(special_ids, input_ids))


def _ids_tensor(ids: frozenset[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(sorted(ids), dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------------------
# EIA at depth 0: nearest neighbour against the exact per-position candidates


def position_candidates(bottom: SplitBottom, position: int) -> torch.Tensor:
    """``LayerNorm(W + pos[position] + type[0])`` for the whole vocabulary, ``[V, H]``.

    This is what the depth-0 bottom sends for each possible token at that position, computed with the
    model's own embeddings modules (the white-box server has them), so a clean vector matches one row
    exactly up to float rounding.
    """
    emb = bottom.model.bert.embeddings
    with torch.no_grad():
        shift = emb.position_embeddings.weight[position] + emb.token_type_embeddings.weight[0]
        return emb.LayerNorm(emb.word_embeddings.weight + shift)


def _check_observed(observed: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if observed.dim() != 3 or tuple(attention_mask.shape) != tuple(observed.shape[:2]):
        raise UserError(f"observed hidden states must be [B, T, H] with a [B, T] attention mask "
                        f"(got {tuple(observed.shape)} and {tuple(attention_mask.shape)})")


def nearest_tokens(bottom: SplitBottom, observed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """For every position, the token whose depth-0 vector there is nearest (L2) to ``observed``, ``[B, T]``.

    Exact inversion at depth 0; at depth ≥ 1 it is the naive baseline (blocks are residual, so a hidden
    state stays near its input) and a starting point for :func:`eia_optimize`. Padding positions get the
    tokenizer's pad id.

    ``argmin_v ‖o − c_v‖² = argmin_v (‖c_v‖² − 2 o·c_v)`` with ``c_v`` the :func:`position_candidates`
    row. Building the ``[V, H]`` candidates per position costs ~0.1 s each (memory-bound), so the
    LayerNorm is expanded instead: every term is a matmul against the row-centred ``W``, done once for
    all positions and all observed vectors (the test checks it against the module-built candidates).
    """
    _check_observed(observed, attention_mask)
    batch, length, _ = observed.shape
    emb = bottom.model.bert.embeddings
    device = emb.word_embeddings.weight.device
    pad = bottom.tokenizer.pad_token_id
    out = torch.full((batch, length), 0 if pad is None else int(pad), dtype=torch.long, device=device)
    real = attention_mask.bool().to(device)
    if not real.any():
        return out
    with torch.no_grad():
        norm = emb.LayerNorm
        gain, bias, eps = norm.weight.float(), norm.bias.float(), float(norm.eps)
        words = emb.word_embeddings.weight.float()
        hidden = words.shape[1]
        centred = words - words.mean(dim=1, keepdim=True)  # x − mean(x) = W̃_v + s̃_p: centring is linear
        positions = torch.arange(length, device=device)
        shift = emb.position_embeddings.weight[positions].float() + emb.token_type_embeddings.weight[0].float()
        shift = shift - shift.mean(dim=1, keepdim=True)  # s̃_p  [T, H]
        # per (token, position): σ = sqrt(var + eps), ‖c‖² = Σg²x̃²/σ² + 2Σgbx̃/σ + ‖b‖²
        cross = centred @ torch.cat([shift, shift * gain**2, (gain * bias)[None]], dim=0).T  # [V, 2T+1]
        squared = centred**2
        var = (squared.sum(dim=1, keepdim=True) + 2 * cross[:, :length] + (shift**2).sum(dim=1)) / hidden
        sigma = (var.clamp_min(0) + eps).sqrt()  # [V, T]; the clamp only guards float cancellation
        g2x2 = squared @ gain**2
        del squared
        g2x2 = g2x2[:, None] + 2 * cross[:, length:2 * length] + (shift**2 * gain**2).sum(dim=1)
        gbx = cross[:, -1:] + shift @ (gain * bias)
        cand_norm = g2x2 / sigma**2 + 2 * gbx / sigma + (bias**2).sum()  # [V, T]
        rows, cols = real.nonzero(as_tuple=True)
        obs = observed.detach().float().to(device)[rows, cols]  # [N, H]
        step = 512
        for start in range(0, len(rows), step):
            o, p = obs[start:start + step], cols[start:start + step]
            dot = (centred @ (o * gain).T + (shift[p] * o * gain).sum(dim=1)) / sigma[:, p] + o @ bias  # [V, n]
            out[rows[start:start + step], p] = (cand_norm[:, p] - 2 * dot).argmin(dim=0)
    return out


def eia_nearest(bottom: SplitBottom, observed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """EIA on a depth-0 split: the nearest-neighbour token per position, ``[B, T]`` long.

    Only meaningful at depth 0, where every position is a fixed per-token map plus noise; behind encoder
    blocks tokens mix, so a deeper split must use :func:`eia_optimize`.
    """
    if bottom.depth != 0:
        raise UserError(f"eia_nearest inverts a depth-0 split only (got depth {bottom.depth}); "
                        "use eia_optimize behind encoder blocks")
    return nearest_tokens(bottom, observed, attention_mask)


# ---------------------------------------------------------------------------------------------------------
# EIA behind blocks: optimise a relaxed one-hot input


class _RelaxedEmbedding(torch.autograd.Function):
    """``softmax(Z/τ) @ W`` with a hand-written backward.

    The two ``[N, V]``-sized passes dominate the attack's cost, so the backward reuses the forward's
    softmax and the identity ``Σ_v P_v (gWᵀ)_v = g·e`` (``e`` the output) instead of autograd's
    softmax-backward, and multiplies by a contiguous ``Wᵀ`` (the transposed view is ~2× slower on CPU).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor,
                temperature: float) -> torch.Tensor:
        probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        out = probs @ weight
        ctx.save_for_backward(probs, weight_t, out)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        probs, weight_t, out = ctx.saved_tensors
        inner = grad @ weight_t  # [N, V]
        inner -= (grad * out).sum(dim=-1, keepdim=True)
        inner *= probs
        if ctx.temperature != 1.0:
            inner /= ctx.temperature
        return inner, None, None, None


LOSSES = ("mse", "l2", "cos")


def _inversion_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean per-token distance: ``cos`` (1 − cosine) ignores the norm, ``mse`` is the squared L2 distance."""
    if kind == "l2":
        return (pred - target).norm(dim=-1).mean()
    if kind == "cos":
        return (1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1)).mean()
    return ((pred - target) ** 2).sum(dim=-1).mean()


def _invert_chunk(bottom: SplitBottom, observed: torch.Tensor, attention_mask: torch.Tensor, init: torch.Tensor, *,
                  steps: int, lr: float, temperature: float, init_scale: float, loss: str,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The attack on a few sequences: logits only for the real positions (padding cannot matter)."""
    weight = bottom.word_embeddings.detach()
    weight_t = weight.T.contiguous()
    real = attention_mask.bool()
    count, vocab = int(real.sum()), weight.shape[0]
    # a small random jitter breaks ties among the vocabulary; init_scale sets how firmly the guess is held
    logits = 0.01 * torch.randn(count, vocab, generator=generator)
    logits = logits.to(weight.device, weight.dtype)
    logits[torch.arange(count, device=weight.device), init[real]] += init_scale
    logits.requires_grad_(True)
    target = observed[real]
    base = torch.zeros(*attention_mask.shape, weight.shape[1], device=weight.device, dtype=weight.dtype)
    optimizer = torch.optim.Adam([logits], lr=lr, fused=True)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        relaxed = _RelaxedEmbedding.apply(logits, weight, weight_t, temperature)
        hidden = bottom.forward_embeds(base.masked_scatter(real[..., None], relaxed), attention_mask)
        _inversion_loss(hidden[real], target, loss).backward()
        optimizer.step()
    out = init.clone()
    out[real] = logits.detach().argmax(dim=-1)
    return out


def eia_optimize(bottom: SplitBottom, observed: torch.Tensor, attention_mask: torch.Tensor, *, steps: int = 100,
                 lr: float = 0.2, temperature: float = 1.0, init: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, init_scale: float = 10.0,
                 loss: str = "mse") -> torch.Tensor:
    """EIA at any depth: token ids whose hidden states match ``observed``, ``[B, T]`` long.

    Learns logits ``Z`` over the full vocabulary for every real position; the bottom runs on the relaxed
    embeddings ``softmax(Z/τ) @ W`` (differentiable, unlike a token lookup) and Adam minimises the
    distance to the observed states over real positions; the answer is ``argmax Z``. Padding is never
    optimised: it is masked out of attention, so it cannot change a real position's state.

    ``Z`` starts at ``init_scale`` on a guess — ``init`` (token ids ``[B, T]``) or, by default,
    :func:`nearest_tokens`: blocks are residual, so the depth-0 nearest neighbour is already right for most
    tokens and the optimisation only has to fix the rest (measured on 16 tweets at depth 5: 0.99 recovered
    against 0.82 from a uniform start, ``init_scale=0``, and 0.68 for the nearest neighbour alone).
    ``loss`` is ``mse`` (squared L2, the default: best measured), ``l2`` (dχ noise's own log-likelihood)
    or ``cos`` (1 − cosine); all three are within a few points of each other under noise.
    The bottom's weights get no gradients and their ``requires_grad`` flags are restored afterwards.
    """
    _check_observed(observed, attention_mask)
    if steps < 1 or lr <= 0 or temperature <= 0 or init_scale < 0 or loss not in LOSSES:
        raise UserError(f"eia_optimize needs steps ≥ 1, lr > 0, temperature > 0, init_scale ≥ 0 and a loss in "
                        f"{', '.join(LOSSES)} (got {steps}, {lr}, {temperature}, {init_scale}, {loss!r})")
    device = bottom.word_embeddings.device
    mask = attention_mask.to(device)
    obs = observed.detach().to(device, bottom.word_embeddings.dtype)
    if init is not None and tuple(init.shape) != tuple(attention_mask.shape):
        raise UserError(f"init must hold one token id per position, {tuple(attention_mask.shape)} "
                        f"(got {tuple(init.shape)})")
    guess = (nearest_tokens(bottom, observed, attention_mask) if init is None else init).to(device, torch.long)
    params = list(bottom.model.parameters())
    flags = [p.requires_grad for p in params]
    out = guess.clone()
    try:
        for p in params:
            p.requires_grad_(False)
        for rows in _chunks(mask, max(1, MAX_RELAXED_ELEMENTS // bottom.word_embeddings.shape[0])):
            out[rows] = _invert_chunk(bottom, obs[rows], mask[rows], guess[rows], steps=steps, lr=lr,
                                      temperature=temperature, init_scale=init_scale, loss=loss,
                                      generator=generator)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return out


def _chunks(mask: torch.Tensor, max_tokens: int) -> list[slice]:
    """Consecutive row ranges holding at most ``max_tokens`` real tokens each (at least one row)."""
    counts = mask.sum(dim=1).tolist()
    out, start, held = [], 0, 0
    for i, c in enumerate(counts):
        if i > start and held + c > max_tokens:
            out.append(slice(start, i))
            start, held = i, 0
        held += c
    if counts:
        out.append(slice(start, len(counts)))
    return out


# ---------------------------------------------------------------------------------------------------------
# AIA: a private attribute read off pooled hidden states

AIRLINES = ("united", "usairways", "americanair", "southwestair", "jetblue", "virginamerica")
_HANDLES = [re.compile(rf"@{name}\b", re.IGNORECASE) for name in AIRLINES]


def airline(texts: list[str]) -> list[int | None]:
    """Index into :data:`AIRLINES` of the one airline each text @-mentions; ``None`` for none or several."""
    out: list[int | None] = []
    for text in texts:
        hits = [k for k, handle in enumerate(_HANDLES) if handle.search(text)]
        out.append(hits[0] if len(hits) == 1 else None)
    return out


ATTRIBUTES: dict[str, Callable[[list[str]], list[int | None]]] = {"airline": airline}


def pooled_features(hidden: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """Mean and max over the real tokens of each sequence, ``[B, 2H]`` — a fixed-size view of a text."""
    real = attention_mask.bool()[..., None]
    h = hidden.detach().float()
    mean = (h * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)
    peak = h.masked_fill(~real, float("-inf")).amax(dim=1)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return torch.cat([mean, peak], dim=1).cpu().numpy()


def attribute_inference(train_x: np.ndarray, train_y: list[int] | np.ndarray, test_x: np.ndarray,
                        test_y: list[int] | np.ndarray, *, seed: int = 0) -> dict[str, float | int]:
    """Train the attacker's classifier on its own users, score it on others'.

    Logistic regression on standardised features: a linear probe, the usual AIA attacker. ``chance`` is the
    majority-class share of the test set — what guessing the commonest class achieves without the states.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(train_y) == 0 or len(test_y) == 0 or len(np.unique(train_y)) < 2:
        raise UserError("attribute inference needs a non-empty test set and training labels of ≥ 2 classes")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    folds = int(min(3, np.unique(train_y, return_counts=True)[1].max()))  # a rare class only draws a warning
    clf = pipeline if folds < 2 else GridSearchCV(
        pipeline, {"logisticregression__C": list(AIA_C_GRID)}, scoring="accuracy",
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        clf.fit(train_x, train_y)
    success = float((clf.predict(test_x) == test_y).mean())
    chance = float(np.unique(test_y, return_counts=True)[1].max() / len(test_y))
    return {"success": success, "chance": chance, "n_train": int(len(train_y)), "n_test": int(len(test_y))}


def empirical_privacy(success: float) -> float:
    """1 − attack success: the share of the private information the attack did not get."""
    return 1.0 - success
