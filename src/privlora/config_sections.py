"""TrainConfig sections that live outside config.py (which is at the 500-line limit): the shared ``Strict``
base, privacy-aware early stopping and the causal-LM secret-sharer canaries. config.py re-exports them."""

from __future__ import annotations

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
