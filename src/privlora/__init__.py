"""privlora: LoRA fine-tuning that keeps training data private, and audits that measure what still leaks."""

__version__ = "0.1.0"
