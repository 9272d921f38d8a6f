"""Secret-sharer canaries for language models (Carlini et al. 2019, "The Secret Sharer", USENIX Security).

A canary is a sentence of a fixed format with a random secret, ``"my account number is " + 9 random
digits``, inserted a known number of times (1, 4 and 16 by default) into the fine-tuning data. After
training, its **exposure** measures how much likelier the model finds the inserted secret than the other
secrets the same format allows:

    exposure(s) = log2 |R| − log2 rank(s),

with ``R`` the randomness space (every possible secret) and ``rank(s)`` the position of ``s`` when all
of ``R`` is sorted by the model's log-perplexity ``−log P(secret | prefix)`` (rank 1 = the most likely;
ties count against the canary). A secret the model never saw has expected exposure ≈ 1/ln 2 ≈ 1.44 bits;
an exposure near ``log2 |R|`` means the model would emit this secret first — extractable.

How ``rank`` is found (the ``method`` field of each result):

* **exact** (``|R| ≤ exact_limit``, default 2¹⁴): every secret of ``R`` is scored — the paper's
  definition with no estimate;
* **extrapolated** (larger spaces, e.g. 9 digits = 10⁹ secrets): the paper's §4.2 estimate. ``candidates``
  secrets are drawn uniformly from ``R`` (seeded), a skew-normal is fitted to their log-perplexities, and
  ``exposure ≈ −log2 CDF(log-perplexity of s)`` (clipped to ``[0, log2 |R|]``). The same formula as
  TensorFlow Privacy's ``compute_exposure_extrapolation``. Alongside it, ``exposure_sampled`` is the
  distribution-free "interpolation" estimate ``log2 N − log2(1 + #candidates at least as likely)``,
  which can never exceed ``log2 N`` (a lower bound's worth of resolution, no fitted tail).

The log-perplexity is the **sum** of the secret tokens' negative log-probs after the prefix (the
probability of the whole secret; no end-of-sequence token), so secrets that tokenize into different
numbers of tokens are compared fairly. Canary records are ``{"prompt": prefix, "response": secret}``:
the training side's response-only loss then trains exactly the part exposure measures.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from privlora.audit.lm_signals import BATCH, Encoder, encode_record, encoded_logprobs, model_max_length, pad_id
from privlora.errors import UserError

INSERTIONS = (1, 4, 16)
EXACT_LIMIT = 2 ** 14
CANDIDATES = 4096
_DOMAIN = 0x5EC2E7  # keeps the canary stream apart from other uses of the same seed


@dataclass(frozen=True)
class SecretFormat:
    """A canary sentence: ``prefix`` then ``length`` symbols drawn uniformly from ``alphabet``."""

    prefix: str = "my account number is "
    alphabet: str = "0123456789"
    length: int = 9

    def __post_init__(self) -> None:
        if self.length < 1 or len(set(self.alphabet)) != len(self.alphabet) or len(self.alphabet) < 2:
            raise UserError("a secret format needs length ≥ 1 and an alphabet of ≥ 2 distinct symbols")

    @property
    def space_size(self) -> int:
        """|R|: how many secrets the format allows."""
        return len(self.alphabet) ** self.length

    def random(self, rng: np.random.Generator, n: int) -> list[str]:
        picks = rng.integers(0, len(self.alphabet), size=(n, self.length))
        return ["".join(self.alphabet[i] for i in row) for row in picks]

    def enumerate(self) -> list[str]:
        return ["".join(t) for t in itertools.product(self.alphabet, repeat=self.length)]


@dataclass(frozen=True)
class Canary:
    """One secret and how many times it is inserted into training (0 = a never-inserted control)."""

    secret: str
    insertions: int


def make_canaries(*, seed: int, insertions: Sequence[int] = INSERTIONS, per_count: int = 1, controls: int = 1,
                  fmt: SecretFormat = SecretFormat()) -> list[Canary]:
    """``per_count`` distinct secrets for each insertion count plus ``controls`` never inserted (count 0),
    all distinct and the same for the same seed and format."""
    if per_count < 1 or controls < 0 or any(k < 1 for k in insertions):
        raise UserError("canaries need per_count ≥ 1, controls ≥ 0 and insertion counts ≥ 1")
    counts = [k for k in insertions for _ in range(per_count)] + [0] * controls
    if len(counts) > fmt.space_size:
        raise UserError(f"{len(counts)} canaries do not fit in a space of {fmt.space_size} secrets")
    rng = np.random.default_rng([seed, _DOMAIN])
    secrets: list[str] = []
    while len(secrets) < len(counts):
        secrets += [s for s in fmt.random(rng, len(counts)) if s not in secrets]
        secrets = list(dict.fromkeys(secrets))
    return [Canary(secret=s, insertions=k) for s, k in zip(secrets, counts, strict=False)]


def canary_record(canary: Canary, fmt: SecretFormat = SecretFormat()) -> dict[str, str]:
    return {"prompt": fmt.prefix, "response": canary.secret}


def canary_records(canaries: Sequence[Canary], fmt: SecretFormat = SecretFormat()) -> list[dict[str, str]]:
    """The records to add to a training set: each canary repeated ``insertions`` times (controls: never)."""
    return [canary_record(c, fmt) for c in canaries for _ in range(c.insertions)]


def secret_log_perplexity(model: Any, tokenizer: Any, secrets: Sequence[str], *,
                          fmt: SecretFormat = SecretFormat(), batch_size: int = 4 * BATCH,
                          encoder: Encoder | None = None) -> np.ndarray:
    """``−log P(secret | prefix)`` in nats per secret (sum over its tokens, no EOS). ``encoder`` (record → ids,
    without EOS) replaces the raw encoding when training rendered the prefix its own way (a task's template)."""
    limit = model_max_length(model)
    encoded = [encoder({"prompt": fmt.prefix, "response": s}) if encoder is not None else
               encode_record(tokenizer, {"prompt": fmt.prefix, "response": s}, eos=False, max_length=limit)
               for s in secrets]
    return np.array([-float(lp.sum()) for lp in encoded_logprobs(model, encoded, pad=pad_id(tokenizer),
                                                                 batch_size=batch_size)])


def exposure(model: Any, tokenizer: Any, canaries: Sequence[Canary], *, fmt: SecretFormat = SecretFormat(),
             exact_limit: int = EXACT_LIMIT, candidates: int = CANDIDATES, seed: int = 0,
             batch_size: int = 4 * BATCH, encoder: Encoder | None = None) -> list[dict[str, Any]]:
    """Exposure in bits of every canary (see the module docstring for the exact and extrapolated methods);
    ``encoder`` as in :func:`secret_log_perplexity`."""
    if not canaries:
        return []
    space = fmt.space_size
    canary_ppl = secret_log_perplexity(model, tokenizer, [c.secret for c in canaries], fmt=fmt,
                                       batch_size=batch_size, encoder=encoder)
    out = []
    if space <= exact_limit:
        everything = np.sort(secret_log_perplexity(model, tokenizer, fmt.enumerate(), fmt=fmt,
                                                   batch_size=batch_size, encoder=encoder))
        for c, p in zip(canaries, canary_ppl, strict=True):
            rank = max(1, int(np.searchsorted(everything, p + 1e-5 * max(1.0, abs(p)), side="right")))
            out.append({"secret": c.secret, "insertions": c.insertions, "method": "exact", "space": space,
                        "rank": rank, "log_perplexity": float(p),
                        "exposure": math.log2(space) - math.log2(rank)})
        return out
    if candidates < 10:
        raise UserError(f"exposure by extrapolation needs at least 10 candidates, got {candidates}")
    rng = np.random.default_rng([seed, _DOMAIN, 1])
    sample = secret_log_perplexity(model, tokenizer, fmt.random(rng, candidates), fmt=fmt, batch_size=batch_size,
                                   encoder=encoder)
    params = stats.skewnorm.fit(sample)
    for c, p in zip(canaries, canary_ppl, strict=True):
        cdf = float(stats.skewnorm.cdf(p, *params))
        extrapolated = math.log2(space) if cdf <= 0 else min(math.log2(space), max(0.0, -math.log2(cdf)))
        at_least_as_likely = int((sample <= p).sum())
        out.append({"secret": c.secret, "insertions": c.insertions, "method": "extrapolated", "space": space,
                    "candidates": candidates, "log_perplexity": float(p), "exposure": extrapolated,
                    "exposure_sampled": math.log2(candidates) - math.log2(1 + at_least_as_likely)})
    return out


def exposure_by_insertions(results: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Mean exposure per insertion count (0 = the never-inserted controls)."""
    counts = sorted({r["insertions"] for r in results})
    return {k: float(np.mean([r["exposure"] for r in results if r["insertions"] == k])) for k in counts}
