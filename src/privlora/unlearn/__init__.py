"""Unlearning: forget samples or concepts from a trained adapter, verified by the audit."""
