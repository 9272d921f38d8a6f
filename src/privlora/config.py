"""Typed configs for every command: YAML → pydantic, unknown keys rejected, CLI overrides merged in.

Every option has a default that runs on a laptop CPU; ``configs/*.yaml`` only state what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from privlora.config_sections import CanaryOptions, PrivacyStopOptions, Strict, adaptive_clip_rules, fed_task_defaults
from privlora.config_split import (  # noqa: F401 - re-exported: privlora.config names every config
    SplitConfig,
    SplitDataOptions,
    SplitLoraOptions,
    SplitOptimOptions,
    SplitPrivatizerOptions,
)
from privlora.config_yaml import (  # noqa: F401 - re-exported: privlora.config names them all
    MAX_ALIAS_NODES,
    MAX_QUOTE,
    AliasBomb,
    clip,
    quote,
    read_yaml,
    safe_yaml,
)
from privlora.data.split_presets import DEFAULT_SPLIT, SPLIT_PRESETS, with_preset
from privlora.errors import UserError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
#: the text task's defaults: BERT attention projections and the attention output
TEXT_TARGETS = ("query", "key", "value", "attention.output.dense")


class LoraOptions(Strict):
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    full_finetune: bool = False  # benchmark baseline: train every weight, no LoRA


class DataOptions(Strict):
    #: demo:faces | demo:digits | an image folder | a save_to_disk folder | a dataset name in the HF cache
    source: str = "demo:faces"
    resolution: int | None = Field(None, ge=8, le=2048)  # None: the base model's own size
    split: str = DEFAULT_SPLIT  # a preset of the three fractions below (data/split_presets.py): train | audit
    members: float = Field(SPLIT_PRESETS[DEFAULT_SPLIT]["members"], gt=0, le=1)  # fraction trained on
    aux: float = Field(SPLIT_PRESETS[DEFAULT_SPLIT]["aux"], ge=0, lt=1)  # fraction only MP/SMP's proxy attacker may see
    eval: float = Field(SPLIT_PRESETS[DEFAULT_SPLIT]["eval"], ge=0, lt=1)  # fraction only the audit may see
    #: diffusers' semantics: resize the shorter side to ``resolution``, then crop its centre (True) or a
    #: random square per training step (False; the audit and utility still read the centre crop)
    center_crop: bool = True
    random_flip: bool = False  # horizontal flip with probability ½ per sample and step (training only)
    limit: int | None = Field(None, ge=4)  # a fixed random sample of this many images or rows (demo:tweets has 38k)
    #: Stable Diffusion: keep the frozen VAE's latents and text encoder's states on disk, keyed by the exact
    #: input and the encoders' weights (privlora.tasks.latent_cache); refused with a random crop
    cache_latents: bool = False
    cache_dir: Path | None = None  # None: $XDG_CACHE_HOME/privlora (~/.cache/privlora)
    #: which columns of a Hugging Face dataset / metadata file hold what (privlora.data.sources); None: the
    #: defaults — image: the Image feature or 'image'; caption: 'text', 'caption' or 'prompt'; text: 'text'
    #: (or 'sentence'); label: 'label'
    image_column: str | None = None
    caption_column: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    max_tokens: int = Field(256, ge=8, le=32768)  # causal-lm: tokens per record (prompt cut left, response right)

    @model_validator(mode="before")
    def _preset(cls, values: Any) -> Any:  # explicit fractions win over data.split's
        return with_preset(values) if isinstance(values, dict) else values

    @model_validator(mode="after")
    def _fractions(self) -> DataOptions:
        if self.members + self.aux + self.eval > 1.0 + 1e-9:
            raise ValueError(f"members + aux + eval = {self.members + self.aux + self.eval:.3f} > 1")
        if self.cache_latents and not self.center_crop:
            raise ValueError("data.cache_latents cannot run with a random crop (data.center_crop: false): every "
                             "step crops anew, so no latent repeats; use the centre crop (random flip is fine)")
        return self


class OptimOptions(Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    max_steps: int = Field(400, ge=1)
    #: diffusers' name: when set, max_steps = ceil(epochs · N / min(K·B, N)) for N members (under DP the
    #: expected number of Poisson batches in N/(K·B) epochs); overrides max_steps (privlora.train.epochs)
    num_train_epochs: int | None = Field(None, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)  # global-norm clip for non-DP modes
    #: micro-batches of ``batch_size`` per update (plain/MP/SMP: one update of K×B samples); under DP one
    #: logical Poisson batch with q = K·B/N, processed in physical chunks of ``batch_size``, noised once
    gradient_accumulation_steps: int = Field(1, ge=1)
    #: diffusers.optimization.get_scheduler's names; stepped once per update
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_num_cycles: int = Field(1, ge=1)  # cosine_with_restarts
    lr_power: float = Field(1.0, gt=0)  # polynomial
    #: autocast of the forward pass (the LoRA weights stay fp32); fp16 also scales the loss (GradScaler)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False  # recompute the UNet's activations in backward: less memory


class DPOptions(Strict):
    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)  # None: 1 / (10 · N)
    accountant: Literal["rdp", "prv"] = "rdp"
    #: per-sample: materialised per-sample gradients; ghost: Opacus' ghost clipping (norms only, two
    #: backward passes) — the same mechanism and ε (train/dp_clipping.py)
    clipping: Literal["per-sample", "ghost"] = "per-sample"

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
    #: what the proxy attacker reads: the paper's raw error map, or the adapter's error relative to the
    #: base model's on the same input (privlora.train.calibrated), closer to what LiRA/RMIA exploit
    attacker: Literal["paper", "calibrated"] = "paper"


class EvalOptions(Strict):
    timesteps: tuple[int, ...] = (50, 200, 400, 600, 800)
    samples: int = Field(64, ge=0)  # generations for the Fréchet distance; 0 disables it
    sample_steps: int = Field(50, ge=1)


class ValidationOptions(Strict):
    """Sample images from the current adapter during training (diffusers' ``--validation_prompt``)."""

    prompt: str | None = None  # None: no validation images; ignored (with a note) on unconditional bases
    steps: int = Field(100, ge=1)  # every this many steps: <run>/validation/step-<k>.png
    images: int = Field(4, ge=1, le=64)  # images in each grid


class TrainConfig(Strict):
    name: str = "run"
    out: Path = Path("runs/demo")
    task: Literal["image", "text", "causal-lm"] = "image"  # diffusion | sentence classification | instruction LM
    base: str = "embedded"  # image: embedded | diffusers folder/id; text: minilm | BERT; causal-lm: embedded-lm | an LM
    mode: Literal["plain", "dp", "mp", "smp"] = "plain"
    seed: int = 0
    device: str = "cpu"
    trust_pickle: bool = False
    prompt: str | None = None  # default caption for the SD path when an image has none
    checkpoint_every: int = Field(100, ge=1)
    #: also checkpoint when this many minutes passed since the last one (0: steps only), so a run killed
    #: before its first ``checkpoint_every`` step still has something to resume
    checkpoint_minutes: float = Field(5.0, ge=0)
    log_every: int = Field(10, ge=1)
    #: where metrics.jsonl's rows and the validation grids are mirrored (train/reporters.py): none |
    #: tensorboard (<run>/tensorboard/) | mlflow (<run>/mlruns, needs the mlflow extra)
    report_to: Literal["none", "tensorboard", "mlflow"] = "none"
    resume: bool = False
    quiet: bool = False
    lora: LoraOptions = LoraOptions()
    data: DataOptions = DataOptions()
    optim: OptimOptions = OptimOptions()
    dp: DPOptions = DPOptions()
    mp: MPOptions = MPOptions()
    eval: EvalOptions = EvalOptions()
    privacy_stop: PrivacyStopOptions = PrivacyStopOptions()
    validation: ValidationOptions = ValidationOptions()
    canaries: CanaryOptions = CanaryOptions()  # causal-lm: secret-sharer canaries among the members (config_sections)

    @model_validator(mode="after")
    def _supported(self) -> TrainConfig:
        """Combinations privlora cannot run correctly are refused here, before any work."""
        o = self.optim
        if self.mode == "dp" and o.mixed_precision == "fp16":
            raise ValueError("optim.mixed_precision fp16 cannot run with mode dp: Opacus clips per-sample "
                             "gradients before a GradScaler could unscale them; use bf16")
        if self.mode == "dp" and o.gradient_checkpointing:
            raise ValueError("optim.gradient_checkpointing cannot run with mode dp: Opacus loses the "
                             "per-sample gradients of recomputed blocks (measured: 37 of 100 LoRA tensors)")
        if self.task != "image" and (o.gradient_checkpointing or self.data.random_flip or not self.data.center_crop):
            raise ValueError("gradient checkpointing, random flip and random crop are for image runs only")
        if self.task != "image" and (self.data.cache_latents or self.validation.prompt is not None):
            raise ValueError("data.cache_latents and validation images are for image runs only")
        if self.canaries.insertions and self.task != "causal-lm":
            raise ValueError("canaries (secret-sharer records) are for causal-lm runs only")
        return self

    @model_validator(mode="after")
    def _text_defaults(self) -> TrainConfig:
        """A text or causal-lm run that names no base, data or LoRA targets gets its task's, not the image ones."""
        if self.task == "image":
            return self
        if self.lora.full_finetune:
            raise ValueError(f"lora.full_finetune is for the image benchmark only, not the {self.task} task")
        text, update = self.task == "text", dict[str, Any]()  # causal-lm's targets "auto": the LM family's
        if "base" not in self.model_fields_set or self.base == "embedded":
            update["base"] = "minilm" if text else "embedded-lm"
        if "source" not in self.data.model_fields_set:
            update["data"] = self.data.model_copy(update={"source": "demo:tweets" if text else "demo:support"})
        if "targets" not in self.lora.model_fields_set:
            update["lora"] = self.lora.model_copy(update={"targets": TEXT_TARGETS if text else ("auto",)})
        return self.model_copy(update=update) if update else self


class FedLoraOptions(Strict):
    rank: int = Field(8, ge=1, le=384)
    alpha: float = Field(16.0, gt=0)
    targets: tuple[str, ...] = TEXT_TARGETS
    #: FLoRA only: one rank per client (cycled), e.g. [4, 8, 16] — clients may differ
    client_ranks: tuple[int, ...] | None = None
    #: FedIT/FFA: {first round: rank}, e.g. {1: 8, 4: 16, 7: 4}; shrinking truncates BA by SVD
    rank_schedule: dict[int, int] | None = None


class FedDataOptions(Strict):
    source: str = "demo:tweets"  # or a CSV/TSV/JSONL file with text,label
    limit: int | None = Field(2000, ge=20)  # a seeded sample of the corpus (38k tweets)
    test: float = Field(0.2, gt=0, lt=1)  # held by the server for the global model's accuracy
    alpha: float | None = Field(0.5, gt=0)  # Dirichlet label skew across clients; null: IID


class FedClientOptions(Strict):
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)


class FedDPOptions(Strict):
    """Client-level DP (``level: client``): every client clips its upload and adds noise before it leaves
    the client. Sample-level DP (``level: sample``): every client runs DP-SGD on its own data
    (``clip`` per sample, ``noise_multiplier`` per step — or, with ``target_epsilon``, the σ at which that
    client, taking part in every round, ends at the target) and keeps its own ε ledger, capped by ``budget``
    (default: ``target_epsilon``)."""

    level: Literal["client", "sample"] = "client"
    budget: float | None = Field(None, gt=0)  # sample: a client refuses a round that would exceed this ε
    mechanism: Literal["none", "gaussian", "laplace"] = "none"
    clip: float = Field(1.0, gt=0)  # L2 bound (gaussian) or L1 bound (laplace) of one client's upload
    noise_multiplier: float | None = Field(None, gt=0)  # gaussian: σ (std = σ·clip)
    target_epsilon: float | None = Field(None, gt=0)  # gaussian: σ for this ε after all rounds (sample: per client)
    delta: float = Field(1e-5, gt=0, lt=1)
    placement: Literal["local", "distributed"] = "local"  # distributed: σ·clip/√m per client, needs secagg
    schedule: Literal["constant", "linear", "exponential"] = "linear"  # laplace: ε per round
    epsilon_start: float = Field(4.0, gt=0)  # laplace: ε of round 1 (loose early)
    epsilon_end: float = Field(1.0, gt=0)  # laplace: ε of the last round (strict late)
    clipping: Literal["fixed", "adaptive"] = "fixed"  # adaptive: C tracks a norm quantile (federated/adaptive_clip)
    target_quantile: float = Field(0.5, gt=0, lt=1)  # adaptive: the share of updates left unclipped
    clip_lr: float = Field(0.2, gt=0)  # adaptive: η_C of the geometric step C·exp(−η_C(b̄ − γ))
    clipped_count_stddev: float | None = Field(None, gt=0)  # adaptive: σ_b of the clients' bits (None: m/20)

    @model_validator(mode="after")
    def _sigma(self) -> FedDPOptions:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("give dp.noise_multiplier or dp.target_epsilon, not both")
        if self.mechanism == "gaussian" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("dp.mechanism gaussian needs dp.noise_multiplier or dp.target_epsilon")
        if self.level == "sample":
            if self.mechanism != "gaussian":
                raise ValueError("dp.level sample is DP-SGD in each client: set dp.mechanism gaussian and "
                                 "dp.noise_multiplier (one σ for all) or dp.target_epsilon (each client its own σ)")
            if self.target_epsilon is not None and self.budget is not None and self.budget < self.target_epsilon:
                raise ValueError(f"dp.budget {self.budget:g} is below dp.target_epsilon {self.target_epsilon:g}: "
                                 "every client would refuse its last rounds")
            if self.placement != "local":
                raise ValueError("dp.level sample adds its noise inside each client's DP-SGD: dp.placement "
                                 "must be local")
        elif self.budget is not None:
            raise ValueError("dp.budget caps a client's own ε: it needs dp.level sample")
        return self


class SecAggOptions(Strict):
    """Flower's SecAgg+ (Bell et al. 2020): the server learns only the (weighted) sum of the uploads."""

    enabled: bool = False
    num_shares: float = Field(1.0, gt=0)  # fraction of clients (or count ≥ 3) each secret is shared with
    reconstruction_threshold: float = Field(0.67, gt=0)  # shares needed to unmask a dropped client
    # every uploaded value must lie in ±this (Flower: 8); LoRA round deltas are ≪ 1, and a smaller range
    # quantises them 8× finer (relative error ~1e-4 instead of ~1e-3, measured); under Gaussian DP the
    # server widens it to clip·(1 + 10σ) so no noisy value is clipped (federated/secagg.py)
    clipping_range: float = Field(1.0, gt=0)
    quantization_range: int = Field(2**22, ge=2)
    timeout: float | None = Field(600.0, gt=0)


class FedHierarchyOptions(Strict):
    edges: int = Field(0, ge=0)  # 0: flat; n: clients grouped into n edge aggregators, then the cloud


class FedAsyncOptions(Strict):
    """FedBuff (Nguyen et al. 2022): merge every ``buffer`` uploads; late ones are down-weighted."""

    enabled: bool = False
    buffer: int = Field(3, ge=1)  # uploads per server step
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    exponent: float = Field(0.5, ge=0)  # polynomial: weight (1 + staleness)^-exponent
    max_staleness: int = Field(4, ge=0)  # older uploads are dropped


class FedSimulationOptions(Strict):
    """Faults and heterogeneity to rehearse in simulation (partition ids)."""

    slow_clients: tuple[int, ...] = ()
    slow_seconds: float = Field(2.0, ge=0)
    crash_clients: tuple[int, ...] = ()
    crash_from_round: int = Field(1, ge=1)
    corrupt_clients: tuple[int, ...] = ()  # send NaN updates (the server must reject them)
    #: resources per simulated client (Ray); 1 CPU each runs two clients at a time on 2 cores
    client_cpus: float = Field(1.0, gt=0)


class FederatedConfig(Strict):
    name: str = "federated"
    out: Path = Path("runs/federated")
    seed: int = 0
    quiet: bool = False
    task: Literal["text", "causal-lm"] = "text"  # federated/tasks.py; causal-lm: fed_task_defaults
    base: str = "minilm"
    strategy: Literal["fedit", "ffa", "flora"] = "ffa"
    rounds: int = Field(5, ge=1)
    clients: int = Field(5, ge=2)
    clients_per_round: int | None = Field(None, ge=1)  # None: every client every round
    engine: Literal["simulation", "deployment"] = "simulation"
    compression: Literal["none", "int8"] = "none"
    sample_cap: float | None = Field(None, gt=0)  # a client's claimed sample count counts at most this
    max_update_norm: float | None = Field(None, gt=0)  # reject larger uploads (DP: derived from clip)
    round_timeout: float = Field(600.0, gt=0)  # a client that has not answered by then is dropped
    lora: FedLoraOptions = FedLoraOptions()
    data: FedDataOptions = FedDataOptions()
    client: FedClientOptions = FedClientOptions()
    dp: FedDPOptions = FedDPOptions()
    secagg: SecAggOptions = SecAggOptions()
    hierarchy: FedHierarchyOptions = FedHierarchyOptions()
    asynchronous: FedAsyncOptions = FedAsyncOptions()
    simulation: FedSimulationOptions = FedSimulationOptions()

    @model_validator(mode="after")
    def _compatible(self) -> FederatedConfig:
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ValueError(f"clients_per_round {self.clients_per_round} > clients {self.clients}")
        if self.secagg.enabled:
            if self.strategy == "flora":
                raise ValueError("secagg needs a summing strategy (fedit or ffa): FLoRA stacks each "
                                 "client's factors, which a secure sum cannot hide")
            if self.compression != "none":
                raise ValueError("secagg quantises the uploads itself; set compression: none")
            if self.asynchronous.enabled:
                raise ValueError("secagg needs a synchronous round (asynchronous.enabled: false)")
        if self.dp.placement == "distributed" and not self.secagg.enabled and self.dp.mechanism != "none":
            raise ValueError("dp.placement distributed relies on secure aggregation: enable secagg or use local")
        if self.lora.client_ranks is not None and self.strategy != "flora":
            raise ValueError("lora.client_ranks (different ranks per client) needs strategy flora")
        if self.lora.rank_schedule is not None and self.strategy == "flora":
            raise ValueError("lora.rank_schedule is for fedit/ffa; FLoRA sets ranks with lora.client_ranks")
        if self.asynchronous.enabled and self.dp.mechanism != "none":
            raise ValueError("asynchronous aggregation cannot be combined with dp: fast clients contribute more "
                             "often than the accountant's client sampling assumes")
        if self.hierarchy.edges and self.secagg.enabled and self.per_round() < 2 * self.hierarchy.edges:
            raise ValueError(f"secure aggregation inside {self.hierarchy.edges} edges needs at least "
                             f"{2 * self.hierarchy.edges} clients per round (2 per edge)")
        if self.hierarchy.edges and self.strategy == "flora":
            raise ValueError("hierarchy.edges needs a summing strategy (fedit or ffa)")
        if self.asynchronous.enabled and self.hierarchy.edges:
            raise ValueError("asynchronous aggregation and hierarchy cannot be combined")
        return self

    _task_defaults = model_validator(mode="after")(fed_task_defaults)
    _adaptive_clip = model_validator(mode="after")(adaptive_clip_rules)

    def per_round(self) -> int:
        return self.clients_per_round or self.clients


#: the most validation problems one error line lists
MAX_PROBLEMS = 5


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"cannot set {quote(dotted)}: {quote(key)} is not a section")
        node = child
    node[leaf] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``optim.lr=1e-4`` → ``("optim.lr", 1e-4)``; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-4), got {quote(text)}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), safe_yaml(raw)
    except AliasBomb as e:
        raise UserError(f"--set {quote(key.strip())}: {e}") from None
    except (yaml.YAMLError, RecursionError):
        return key.strip(), raw


def _describe(err: ValidationError) -> str:
    parts = []
    errors = err.errors()
    for e in errors[:MAX_PROBLEMS]:
        where = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown config key {quote(where)}")
        else:
            parts.append(f"{clip(where)}: {clip(e['msg'])} (got {quote(e.get('input'))})")
    if len(errors) > MAX_PROBLEMS:
        parts.append(f"and {len(errors) - MAX_PROBLEMS} more")
    return "; ".join(parts)


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


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None,
                model: type[BaseModel] = TrainConfig) -> Any:
    """Load a config (``TrainConfig`` unless ``model`` says otherwise) from YAML (optional), apply dotted
    overrides, validate strictly.

    ``None`` values are ignored (flag not given); :data:`CLEAR` removes the key.
    """
    tree = read_yaml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        if value is CLEAR:
            _clear_dotted(tree, dotted)
        elif value is not None:
            _set_dotted(tree, dotted, value)
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise UserError(f"invalid config: {_describe(e)}") from None


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML: exactly what ran, loadable by :func:`load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
