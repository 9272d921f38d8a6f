"""The claim itself, on a small seeded case: DP-LoRA and SMP-LoRA (calibrated attacker) leave the strongest
membership attack with a lower AUC than plain LoRA trained with the same recipe on the same images.

Sixteen faces trained hard (200 steps of 8, each face seen 100 times) so that plain LoRA memorises them; the
two cheapest attacks without references (loss, PIA) against sixteen evaluation non-members."""

from __future__ import annotations

import pytest

from conftest import CONFIGS
from privlora.audit.runner import audit_run
from privlora.config import load_config
from privlora.train.loop import train

# three trainings of 200 steps and three audits: ~4 min on a quiet 2-core machine, far more beside other slow tests
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Optimal order")]

RECIPE = {"data.members": 0.16, "data.aux": 0.16, "data.eval": 0.16, "optim.batch_size": 8,
          "optim.max_steps": 200, "optim.lr": 1e-2, "lora.rank": 8, "lora.alpha": 8, "eval.samples": 0,
          "eval.timesteps": [200], "quiet": True}
MODES = {"plain": {"mode": "plain"},
         "dp": {"mode": "dp", "dp.target_epsilon": 8.0, "dp.max_grad_norm": 0.02},
         "smp": {"mode": "smp", "mp.attacker": "calibrated", "mp.alpha": 1.0, "mp.attacker_lr": 1e-3}}


def _strongest(tmp_path, mode: str) -> float:
    out = tmp_path / mode
    train(load_config(CONFIGS / "demo-plain.yaml", {**RECIPE, **MODES[mode], "out": str(out)}))
    results = audit_run(out, attacks=("loss", "pia"))
    return max(a["adapter"]["auc"] for a in results["attacks"].values())


def test_dp_and_smp_lower_the_strongest_attack_against_plain_with_the_same_recipe(tmp_path):
    plain = _strongest(tmp_path, "plain")
    dp = _strongest(tmp_path, "dp")
    smp = _strongest(tmp_path, "smp")
    print(f"strongest attack AUC: plain {plain:.3f}, dp {dp:.3f}, smp {smp:.3f}")
    # measured (seeded, 2-core CPU): plain 0.621, dp 0.527, smp 0.520. With 16 + 16 images each AUC is ±0.1
    # (bootstrap), so this is a seeded check that the modes move the audit the claimed way on one case, not
    # a statistical proof: that is the frontier's (benchmarks/frontier.py, 1,000 + 1,000 cards).
    assert plain >= 0.6, plain  # the recipe does memorise: otherwise there is nothing to defend
    assert dp <= plain - 0.05, (dp, plain)
    assert smp <= plain - 0.05, (smp, plain)
