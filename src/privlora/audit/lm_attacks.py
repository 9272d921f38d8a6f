"""Membership attacks on causal language models, computed from per-token log-probabilities.

Every scorer returns one score per record, **higher = more likely a training member**, the convention of
:mod:`privlora.audit.metrics`. ``ℓ_t = log P(r_t | prompt, r_<t)`` are the response's token log-probs
(:mod:`privlora.audit.lm_signals`), ``NLL = −mean_t ℓ_t`` (nats per token, the log-perplexity).

* ``loss`` (Yeom et al. 2018; Carlini et al. 2021's "perplexity" baseline): ``−NLL``.
* ``zlib`` (Carlini et al. 2021, "Extracting Training Data from Large Language Models", §6.1):
  ``−NLL / zlib(r)``, with ``zlib(r)`` the byte length of the zlib-compressed UTF-8 response. A text that
  is merely easy (repetitive, formulaic) compresses well *and* has a low NLL; dividing by its compressed
  size asks whether the model finds it easier than its information content. Carlini et al. and the
  Min-K% reference code (``np.log(ppl) / zlib_entropy``) use exactly this ratio, on the scored text.
* ``reference`` (Carlini et al. 2021 §6.1 "comparing to other neural language models"; the form of Shi et
  al.'s reference code, ``p1_likelihood − p_ref_likelihood``): ``−(NLL_target − NLL_base)``. The base model
  the adapter was trained from is the reference, so what the base already found likely cancels.
  Carlini et al. take the *ratio* of log-perplexities; the difference is the calibrated form later work
  uses and is scale-free in the same way. On the base model itself (the control) the score is 0 for every
  record, AUC exactly 0.5 by construction.
* ``min_k`` (Shi et al. 2024, "Detecting Pretraining Data from Large Language Models", Min-K% Prob):
  the mean of the ``k`` % lowest token log-probs, ``k = 20 %`` (the paper's default). A non-member tends
  to hold a few surprising outlier tokens; a member has few. ``⌊k·n⌋`` tokens, at least one (the reference
  code's ``int(len * ratio)`` would be empty for short responses).
* ``lira`` / ``rmia``: the reference-model attacks of :mod:`privlora.audit.references`, on the signal
  ``NLL`` (lower = member). LiRA's Gaussians fit it across references; RMIA's ``p(x|θ) = exp(−NLL)`` is the
  per-token geometric-mean probability — length-normalised, so a long response does not underflow and
  dominate the population comparison.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from privlora.audit.lm_signals import mean_nll
from privlora.audit.references import lira_scores, rmia_scores
from privlora.errors import UserError

MIN_K = 0.2  # Shi et al. 2024's default k


def zlib_bytes(texts: Sequence[str]) -> np.ndarray:
    """Length in bytes of each text's zlib-compressed UTF-8 encoding (Carlini et al. 2021's zlib entropy)."""
    return np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)


def loss_scores(logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """``−NLL``: members have lower loss."""
    return -mean_nll(logprobs)


def zlib_scores(logprobs: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
    """``−NLL / zlib bytes`` of the scored text."""
    if len(texts) != len(logprobs):
        raise UserError(f"{len(texts)} texts for {len(logprobs)} scored records")
    return -mean_nll(logprobs) / zlib_bytes(texts)


def reference_calibrated_scores(logprobs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> np.ndarray:
    """``NLL_reference − NLL_target``: how much likelier the target finds the record than the reference does."""
    if len(reference) != len(logprobs):
        raise UserError(f"{len(reference)} reference scores for {len(logprobs)} records")
    return mean_nll(reference) - mean_nll(logprobs)


def min_k_scores(logprobs: Sequence[np.ndarray], k: float = MIN_K) -> np.ndarray:
    """Mean of the ``k`` fraction of lowest token log-probs (at least one token) per record."""
    if not 0 < k <= 1:
        raise UserError(f"Min-K% needs k in (0, 1], got {k}")
    out = np.empty(len(logprobs))
    for i, lp in enumerate(logprobs):
        n = max(1, int(len(lp) * k))
        out[i] = float(np.sort(lp)[:n].mean())
    return out


@dataclass(frozen=True)
class Inputs:
    """What the scorers may read for one audited model (the target, or the base as control)."""

    logprobs: list[np.ndarray]
    base: list[np.ndarray]  # the reference model's (the base) log-probs on the same records
    texts: list[str]  # the scored responses
    min_k: float = MIN_K


@dataclass(frozen=True)
class LmAttack:
    """A model-only attack: its scorer over :class:`Inputs`, and where it comes from."""

    score: Callable[[Inputs], np.ndarray]
    paper: str


MODEL_ATTACKS: dict[str, LmAttack] = {
    "loss": LmAttack(lambda x: loss_scores(x.logprobs), "Yeom et al. 2018; Carlini et al. 2021"),
    "zlib": LmAttack(lambda x: zlib_scores(x.logprobs, x.texts), "Carlini et al. 2021 (zlib ratio)"),
    "reference": LmAttack(lambda x: reference_calibrated_scores(x.logprobs, x.base),
                          "Carlini et al. 2021 (reference model); Shi et al. 2024 reference code"),
    "min_k": LmAttack(lambda x: min_k_scores(x.logprobs, x.min_k), "Shi et al. 2024 (Min-K% Prob)"),
}
REFERENCE_ATTACKS: dict[str, str] = {"lira": "Carlini et al. 2022 (LiRA, online)",
                                     "rmia": "Zarifzadeh et al. 2024 (RMIA)"}


def lm_lira(signal: np.ndarray, ref_signals: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """LiRA on the NLL signal: ``signal [N]``, ``ref_signals [K, N]``, ``inside [K, N]`` booleans."""
    if ref_signals.shape != inside.shape or ref_signals.shape[1:] != signal.shape:
        raise UserError(f"reference signals {ref_signals.shape}, membership {inside.shape} and "
                        f"{signal.shape[0]} audited records do not line up")
    return lira_scores(signal, ref_signals, inside)


def lm_rmia(signal: np.ndarray, ref_signals: np.ndarray, signal_z: np.ndarray, ref_signals_z: np.ndarray,
            gamma: float = 1.0) -> np.ndarray:
    """RMIA on the NLL signal against population records ``z`` that no reference trained on."""
    if signal_z.size == 0:
        raise UserError("RMIA needs population records (non-members no reference trained on)")
    return rmia_scores(signal, ref_signals, signal_z, ref_signals_z, gamma=gamma)
