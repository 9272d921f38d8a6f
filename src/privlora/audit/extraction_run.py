"""``privlora audit --extraction N``: extraction and the latent probe on one run, with base-model controls.

Glue between a loaded run and :mod:`privlora.audit.extraction`: the same ``N`` latents go through the
adapter and through the base alone (the control), the training set is the run's members, and the latent
probe compares members against the run's evaluation non-members. Writes ``<run>/audit/extraction.json``
and ``<run>/audit/extraction_gallery.png`` (each atomically) and returns the summary the report shows.
"""

from __future__ import annotations

from typing import Any

from privlora.audit.extraction import LatentProbe, extract
from privlora.runs import write_json_atomic

BATCH = 64  # generations per sampling pass: memory, not statistics (results do not depend on it)
GALLERY = "extraction_gallery.png"
RESULT = "extraction.json"


def _short(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("generated", "extracted", "extracted_fraction", "unique_extracted", "largest_cluster", "quantiles")
    return {k: result[k] for k in keep}


def run_extraction(loaded: Any, *, n: int, seed: int, quiet: bool) -> dict[str, Any]:
    """Extraction (adapter vs base) and latent probe (members vs held-out, adapter vs base) for one run."""
    task, audit_dir = loaded.task, loaded.path / "audit"
    steps = loaded.config.eval.sample_steps  # the run's own sampler setting
    params = {"n": n, "seed": seed, "batch": BATCH, "sample_steps": steps}
    probe = LatentProbe(loaded.members, loaded.held_out, task.device)
    adapter = extract(task, loaded.members, n=n, seed=seed, batch=BATCH, sample_steps=steps, quiet=quiet,
                      on_batch=probe.update)
    with task.adapter_disabled():  # the same latents through the base alone
        base_probe = LatentProbe(loaded.members, loaded.held_out, task.device)
        base = extract(task, loaded.members, n=n, seed=seed, batch=BATCH, sample_steps=steps, gallery=0,
                       quiet=quiet, on_batch=base_probe.update)
    probe, base_probe = probe.result(params), base_probe.result(params)
    full = adapter.to_json()
    result = {**full, "base_extracted": int(base.extracted.sum()), "base_control": _short(base.to_json()),
              "latent_probe": {"adapter": probe["summary"], "base_control": base_probe["summary"],
                               "method": probe["method"]}}
    if adapter.gallery:
        adapter.gallery_png(audit_dir / GALLERY)
    write_json_atomic(audit_dir / RESULT, result)
    return {"generated": n, "extracted": result["extracted"], "base_extracted": result["base_extracted"],
            "latent_probe_auc": probe["summary"].get("auc"), "base_latent_probe_auc": base_probe["summary"].get("auc")}
