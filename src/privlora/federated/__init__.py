"""Federated LoRA (issue 6): aggregation rules so far; the Flower apps build on them."""
