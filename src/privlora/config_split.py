"""``privlora split train``'s configuration (the user's side of split learning, SAP): re-exported by
:mod:`privlora.config`, which names every config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from privlora.config_sections import Strict


class SplitPrivatizerOptions(Strict):
    name: Literal["none", "dchi", "cti"] = "cti"
    eta: float | None = Field(3.0, gt=0)  # dχ: noise density ∝ exp(−η‖n‖), mean noise norm = hidden/η
    cti_top_k: int = Field(50, ge=1)  # CTI: how many label-carrying tokens are spared
    cti_boost: float = Field(100.0, ge=1)  # CTI: those tokens get η·boost (boost× less noise)
    cti_min_count: int = Field(5, ge=1)  # CTI: only tokens seen in at least this many training texts

    @model_validator(mode="after")
    def _eta(self) -> SplitPrivatizerOptions:
        if self.name != "none" and self.eta is None:
            raise ValueError(f"privatizer {self.name} needs eta")
        return self


class SplitLoraOptions(Strict):
    rank: int = Field(8, ge=1, le=384)  # LoRA on the bottom's blocks (trainable bottom only)
    alpha: float = Field(16.0, gt=0)


class SplitDataOptions(Strict):
    source: str = "demo:tweets"  # demo:tweets | CSV/TSV/JSONL with text,label
    limit: int | None = Field(2000, ge=4)
    eval: float = Field(0.3, gt=0, lt=1)  # held out on the user's side to measure accuracy


class SplitOptimOptions(Strict):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1, le=64)
    lr: float = Field(1e-3, gt=0)  # the trainable bottom's (the server sets its own with --lr)


class SplitConfig(Strict):
    """``privlora split train``: the user's side (the server's depth/base come from the server)."""

    name: str = "split"
    out: Path = Path("runs/split")
    seed: int = 0
    quiet: bool = False
    server: str = "http://127.0.0.1:8765"
    #: text: a classifier (MiniLM, labels stay here); causal-lm: a GPT-2-family LM whose LM head stays here
    #: too (privlora.split.lm_models); defaults for it: base embedded-lm, demo:support, the dχ privatizer
    task: Literal["text", "causal-lm"] = "text"
    base: str = "minilm"  # must be the server's base: minilm or a local BERT-family folder
    bottom: Literal["frozen", "trainable"] = "frozen"
    lora: SplitLoraOptions = SplitLoraOptions()
    privatizer: SplitPrivatizerOptions = SplitPrivatizerOptions()
    data: SplitDataOptions = SplitDataOptions()
    optim: SplitOptimOptions = SplitOptimOptions()

    @model_validator(mode="after")
    def _task(self) -> SplitConfig:
        if self.task == "text":
            return self
        if self.bottom == "trainable":
            raise ValueError("a causal LM's split bottom is frozen (bottom: frozen); its LM head is the user's")
        update: dict[str, Any] = {}
        if self.privatizer.name == "cti":
            if "name" in self.privatizer.model_fields_set:
                raise ValueError("privatizer cti spares the tokens that carry a class label; a causal LM has no "
                                 "labels: use dchi or none")
            update["privatizer"] = self.privatizer.model_copy(update={"name": "dchi"})  # the default for the LM
        if "base" not in self.model_fields_set:
            update["base"] = "embedded-lm"
        if "source" not in self.data.model_fields_set:
            update["data"] = self.data.model_copy(update={"source": "demo:support"})
        return self.model_copy(update=update) if update else self
