"""TrainConfig sections that live outside config.py (which is at the 500-line limit): the shared ``Strict``
base, privacy-aware early stopping and the causal-LM secret-sharer canaries. config.py re-exports them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrivacyStopOptions(Strict):
    """Privacy-aware early stopping (``privlora.train.privacy_stop``): every ``every`` steps a base-calibrated
    loss attack scores a probe of training members against aux non-members; once its advantage
    ``2·AUC − 1`` exceeds ``max_advantage`` the run stops and keeps the adapter of the last check it passed."""

    every: int | None = Field(None, ge=1)  # steps between checks (and one at max_steps); None: off
    probe: int = Field(64, ge=2)  # members and aux non-members each (fewer when a split is smaller)
    max_advantage: float = Field(0.1, ge=0, le=1)  # bound on the probe attack's 2·AUC − 1
    timesteps: tuple[int, ...] | None = Field(None, min_length=1)  # None: the audit's loss-signal timesteps


class CanaryOptions(Strict):
    """Secret-sharer canaries (Carlini et al. 2019; :mod:`privlora.audit.lm_canaries`) for causal-lm runs:
    ``per_count`` random secrets per insertion count join the *members* (each copy one record), ``controls``
    more are never inserted; the run directory's canaries.json lists them, and ``privlora audit`` reports
    their exposure. Empty ``insertions``: no canaries."""

    insertions: tuple[int, ...] = ()  # e.g. [1, 4, 16]: how many copies of a secret training sees
    per_count: int = Field(1, ge=1, le=100)  # secrets per insertion count
    controls: int = Field(1, ge=0, le=100)  # secrets of the same format never inserted (exposure ≈ 1.44 bits)
    seed: int | None = None  # None: the run's seed
    prefix: str = "my account number is "  # the canary's prompt; the secret is the response trained on
    alphabet: str = Field("0123456789", min_length=2)
    length: int = Field(9, ge=1, le=32)  # symbols per secret: |R| = len(alphabet) ** length

    @model_validator(mode="after")
    def _counts(self) -> CanaryOptions:
        if any(k < 1 for k in self.insertions):
            raise ValueError(f"canaries.insertions must be counts ≥ 1, got {list(self.insertions)}")
        if len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError("canaries.alphabet must not repeat a symbol")
        return self


def fed_task_defaults(config: Any) -> Any:
    """FederatedConfig's ``task`` defaults (a model validator; config.py is at its line limit): a causal-lm
    run that names no base, data, LoRA targets or skew gets the LM's — ``embedded-lm``, ``demo:support``,
    the family's targets (``auto``) and an IID split (``data.alpha: null``, FlowerTune's partitioner: the
    records have no label to skew; a number gives a Dirichlet *size* skew, privlora.federated.tasks)."""
    if config.task == "text":
        return config
    if config.strategy == "flora":
        raise ValueError("strategy flora is for task text (its dense ΔW assumes [out, in] weights; GPT-2's "
                         "Conv1D stores [in, out]): use ffa or fedit for task causal-lm")
    update: dict[str, Any] = {}
    if "base" not in config.model_fields_set:
        update["base"] = "embedded-lm"
    data: dict[str, Any] = {}
    if "source" not in config.data.model_fields_set:
        data["source"] = "demo:support"
    if "alpha" not in config.data.model_fields_set:
        data["alpha"] = None
    if data:
        update["data"] = config.data.model_copy(update=data)
    if "targets" not in config.lora.model_fields_set:
        update["lora"] = config.lora.model_copy(update={"targets": ("auto",)})
    return config.model_copy(update=update) if update else config


def adaptive_clip_rules(config: Any) -> Any:
    """FederatedConfig's rules for ``dp.clipping: adaptive`` (a model validator; config.py is at its line
    limit). The clients' clipped bits are read one reply at a time, so the rounds must be flat, synchronous
    and without secure aggregation; the bits' noise is added locally like the updates' (Andrew et al. 2021)."""
    dp = config.dp
    if dp.clipping == "fixed":
        return config
    if dp.level != "client" or dp.mechanism != "gaussian":
        raise ValueError("dp.clipping adaptive is client-level Gaussian DP: set dp.level client and "
                         "dp.mechanism gaussian")
    if dp.placement != "local":
        raise ValueError("dp.clipping adaptive adds every client's noise locally: dp.placement must be local")
    if config.secagg.enabled or config.hierarchy.edges or config.asynchronous.enabled:
        raise ValueError("dp.clipping adaptive reads each client's clipped bit from its reply: it needs flat, "
                         "synchronous rounds without secagg (use dp.clipping fixed with those)")
    return config
