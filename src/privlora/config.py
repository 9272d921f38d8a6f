"""Typed configs for every command: YAML → pydantic, unknown keys rejected, CLI overrides merged in.

Every option has a default that runs on a laptop CPU; ``configs/*.yaml`` only state what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privlora.errors import UserError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
#: the text task's defaults: BERT attention projections and the attention output
TEXT_TARGETS = ("query", "key", "value", "attention.output.dense")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraOptions(Strict):
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    full_finetune: bool = False  # benchmark baseline: train every weight, no LoRA


class DataOptions(Strict):
    source: str = "demo:faces"  # demo:faces | demo:digits | path to an image folder
    resolution: int | None = Field(None, ge=8, le=2048)  # None: the base model's own size
    members: float = Field(0.32, gt=0, le=1)  # fraction trained on
    aux: float = Field(0.32, ge=0, lt=1)  # fraction only MP/SMP's proxy attacker may see
    eval: float = Field(0.36, ge=0, lt=1)  # fraction only the audit may see
    center_crop: bool = True
    limit: int | None = Field(None, ge=4)  # text: a seeded sample of this many rows (demo:tweets has 38k)

    @model_validator(mode="after")
    def _fractions(self) -> DataOptions:
        if self.members + self.aux + self.eval > 1.0 + 1e-9:
            raise ValueError(f"members + aux + eval = {self.members + self.aux + self.eval:.3f} > 1")
        return self


class OptimOptions(Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    max_steps: int = Field(400, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)  # global-norm clip for non-DP modes


class DPOptions(Strict):
    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)  # None: 1 / (10 · N)
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _one_of(self) -> DPOptions:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("give dp.noise_multiplier or dp.target_epsilon, not both")
        return self


class MPOptions(Strict):
    """MP-/SMP-LoRA (Luo et al. 2024). Defaults from the authors' scripts: α=β=1, attacker Adam 1e-5."""

    alpha: float = Field(1.0, ge=0)
    beta: float = Field(1.0, gt=0)
    attacker_lr: float = Field(1e-5, gt=0)
    attacker_weight_decay: float = Field(1e-4, ge=0)
    attacker_steps: int = Field(1, ge=1)  # attacker updates per LoRA step (the paper's k)
    hidden: tuple[int, int] = (512, 256)


class EvalOptions(Strict):
    timesteps: tuple[int, ...] = (50, 200, 400, 600, 800)
    samples: int = Field(64, ge=0)  # generations for the Fréchet distance; 0 disables it
    sample_steps: int = Field(50, ge=1)


class TrainConfig(Strict):
    name: str = "run"
    out: Path = Path("runs/demo")
    task: Literal["image", "text"] = "image"  # diffusion on images | sentence classification on text
    base: str = "embedded"  # image: embedded | diffusers folder or id; text: minilm | a BERT folder
    mode: Literal["plain", "dp", "mp", "smp"] = "plain"
    seed: int = 0
    device: str = "cpu"
    trust_pickle: bool = False
    prompt: str | None = None  # default caption for the SD path when an image has none
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    resume: bool = False
    quiet: bool = False
    lora: LoraOptions = LoraOptions()
    data: DataOptions = DataOptions()
    optim: OptimOptions = OptimOptions()
    dp: DPOptions = DPOptions()
    mp: MPOptions = MPOptions()
    eval: EvalOptions = EvalOptions()

    @model_validator(mode="after")
    def _text_defaults(self) -> TrainConfig:
        """A text run that names no base, data or LoRA targets gets the text task's, not the image ones."""
        if self.task != "text":
            return self
        if self.lora.full_finetune:
            raise ValueError("lora.full_finetune is for the image benchmark only, not the text task")
        update: dict[str, Any] = {}
        if "base" not in self.model_fields_set or self.base == "embedded":
            update["base"] = "minilm"
        if "source" not in self.data.model_fields_set:
            update["data"] = self.data.model_copy(update={"source": "demo:tweets"})
        if "targets" not in self.lora.model_fields_set:
            update["lora"] = self.lora.model_copy(update={"targets": TEXT_TARGETS})
        return self.model_copy(update=update) if update else self
        if "base" not in self.model_fields_set or self.base == "embedded":
            self.base = "minilm"
        if "source" not in self.data.model_fields_set:
            self.data = self.data.model_copy(update={"source": "demo:tweets"})
        if "targets" not in self.lora.model_fields_set:
            self.lora = self.lora.model_copy(update={"targets": TEXT_TARGETS})
        if self.lora.full_finetune:
            raise ValueError("lora.full_finetune is for the image benchmark only, not the text task")
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"cannot set {dotted!r}: {key!r} is not a section")
        node = child
    node[leaf] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``optim.lr=1e-4`` → ``("optim.lr", 1e-4)``; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-4), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        return key.strip(), raw


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown config key {where!r}")
        else:
            parts.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing or malformed file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


#: override value that removes a key from the YAML tree (back to its default), e.g. ``--noise-multiplier``
#: on the command line clears a ``target_epsilon`` from the config file: the two are alternatives.
CLEAR: Any = object()


def _clear_dotted(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a train config from YAML (optional), apply dotted overrides, validate strictly.

    ``None`` values are ignored (flag not given); :data:`CLEAR` removes the key.
    """
    tree = read_yaml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        if value is CLEAR:
            _clear_dotted(tree, dotted)
        elif value is not None:
            _set_dotted(tree, dotted, value)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(f"invalid config: {_describe(e)}") from None


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML: exactly what ran, loadable by :func:`load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
