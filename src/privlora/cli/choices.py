"""The fixed value sets of choice options, written out here so that ``privlora --help`` and ``--version`` do
not import torch, OpenCV or pydantic to list them. tests/test_cli_package.py checks each against the library
registry or config type it mirrors, so the two cannot drift apart."""

from __future__ import annotations

MODES = ("plain", "dp", "mp", "smp")  # TrainConfig.mode
TASKS = ("image", "text", "causal-lm")  # TrainConfig.task
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                 "polynomial")  # OptimOptions.lr_scheduler
PRECISIONS = ("no", "fp16", "bf16")  # OptimOptions.mixed_precision
DP_CLIPPINGS = ("per-sample", "ghost")  # DPOptions.clipping, train.dp_clipping.CLIPPING
STRATEGIES = ("ffa", "fedit", "flora")  # FederatedConfig.strategy
FED_DP = ("none", "gaussian", "laplace")  # FedDPOptions.mechanism
COMPRESSIONS = ("none", "int8")  # FederatedConfig.compression
PRIVATIZERS = ("cti", "dchi", "none")  # SplitPrivatizerOptions.name
BOTTOMS = ("frozen", "trainable")  # SplitConfig.bottom
REDACTIONS = ("fill", "pixelate", "blur")  # data.sanitize.redact.REDACTORS
PII_OPERATORS = ("replace", "mask", "hash")  # data.sanitize.pii.operators.OPERATORS
DP_AUDIT_KINDS = ("noise", "blocks", "coarse", "gradient")  # audit.dp_audit_kinds.DP_AUDIT_KINDS
ATTACKS = ("loss", "secmi", "pia", "sima")  # audit.attacks.ATTACKS (model-only attacks)
UNLEARN_METHODS = ("target", "neggrad+", "salun", "retrain")  # unlearn.methods.METHODS
ROLES = ("researcher", "engineer", "auditor", "admin")  # registry.access.ROLES
DATASET_KINDS = ("sanitized", "full")  # registry service: dataset kinds
TEE_KEYS = ("sealed", "provisioned")  # tee.manifest.KEY_SOURCES
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's --log-level
EXPORT_FORMATS = ("peft", "diffusers", "kohya")  # export.FORMATS
REPORTERS = ("none", "tensorboard", "mlflow")  # train.reporters.REPORTERS (--report-to)
SPLITS = ("train", "audit")  # data.split_presets.SPLIT_PRESETS (data.split, train --split)
