"""Split learning in-process: the halves compose exactly, the noise has the dχ density, the step protocol."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import stats

from privlora.errors import UserError
from privlora.split.models import SplitBottom, SplitTop
from privlora.split.privatizers import Privatizer, contributing_tokens, dchi_noise
from privlora.split.service import LocalTop, TopService
from privlora.split.wire import Expect, WireError, pack, unpack
from privlora.tasks.text import TextClassificationTask

TEXTS = ["I love this airline!", "terrible day, my bag is lost @united", "ok then"]


@pytest.fixture(scope="module")
def full_logits() -> torch.Tensor:
    with torch.no_grad():
        return TextClassificationTask(3, lora=None, seed=0).logits({"texts": TEXTS})


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_halves_compose_to_the_full_model(depth, full_logits):
    bottom, top = SplitBottom(depth), SplitTop(depth, 3, seed=0)
    assert len(bottom.model.bert.encoder.layer) == depth  # the user does not hold the provider's blocks
    assert len(top.blocks) == 6 - depth
    ids, mask = bottom.encode(TEXTS)
    with torch.no_grad():
        logits = top.forward(bottom.forward(ids, mask), mask)
    assert torch.allclose(logits, full_logits, atol=1e-5)


def test_depth_limits():
    with pytest.raises(UserError, match="depth ≥ 1"):
        SplitBottom(0, trainable=True)
    with pytest.raises(UserError, match="0..5"):
        SplitTop(6, 3)


@pytest.mark.parametrize("d, eta", [(2, 3.0), (384, 100.0)])
def test_dchi_noise_has_the_exp_minus_eta_norm_density(d, eta):
    """Norms follow Gamma(d, 1/η) (radial part of exp(−η‖n‖) in d dims), directions are uniform."""
    noise = dchi_noise((4000, d), eta, torch.Generator().manual_seed(1))
    norms = noise.norm(dim=-1).numpy()
    assert stats.kstest(norms, stats.gamma(a=d, scale=1 / eta).cdf).pvalue > 0.01
    assert abs(norms.mean() - d / eta) < 0.05 * d / eta
    units = (noise / noise.norm(dim=-1, keepdim=True)).numpy()
    assert np.linalg.norm(units.mean(axis=0)) < 4 / np.sqrt(4000) * 1.5
    if d == 2:  # uniform angle on the circle
        angles = np.arctan2(units[:, 1], units[:, 0])
        assert stats.kstest(angles, stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > 0.01
    again = dchi_noise((4000, d), eta, torch.Generator().manual_seed(1))
    assert torch.equal(noise, again)


def test_privatizers():
    hidden, ids = torch.zeros(2, 4, 384), torch.tensor([[101, 7, 8, 102], [101, 8, 9, 102]])
    assert torch.equal(Privatizer("none")(hidden, ids), hidden)
    cti = Privatizer("cti", 50.0, boost=10.0, contributing={8: {"score": 3.0}})
    eta = cti.token_eta(ids)
    assert eta[0, 2] == eta[1, 1] == 500.0 and eta[0, 1] == eta[1, 2] == 50.0
    big = torch.zeros(1, 2000, 384)
    noised = cti(big, torch.tensor([[8, 9] * 1000]), torch.Generator().manual_seed(0))
    spared, other = noised[0, 0::2].norm(dim=-1).mean(), noised[0, 1::2].norm(dim=-1).mean()
    assert abs(float(other) - 384 / 50) < 0.2 and abs(float(spared) - 384 / 500) < 0.02
    a = Privatizer("dchi", 50.0)(hidden, ids)
    b = Privatizer("dchi", 50.0)(hidden, ids)
    assert not torch.equal(a, b)  # no generator: fresh OS entropy each time
    for bad in [dict(name="laplace", eta=1.0), dict(name="dchi", eta=None), dict(name="cti", eta=-1.0),
                dict(name="cti", eta=1.0, boost=0.5)]:
        with pytest.raises(UserError):
            Privatizer(**bad)


def test_contributing_tokens_finds_planted_label_tokens():
    rng = np.random.default_rng(0)
    docs, labels = [], []
    for i in range(300):
        label = i % 2
        ids = list(rng.integers(1000, 1100, size=8))
        if rng.random() < 0.8:
            ids.append(777 if label else 888)  # planted: 777 says class 1, 888 class 0
        docs.append([101, *ids, 102])
        labels.append(label)
    docs.append([101, 999, 102])  # a token in one text only: under min_count
    labels.append(1)
    found = contributing_tokens(docs, labels, top_k=2, min_count=5, exclude={101, 102})
    assert set(found) == {777, 888}
    assert found[777]["class"] == 1 and found[888]["class"] == 0
    assert 999 not in contributing_tokens(docs, labels, top_k=200, min_count=5, exclude={101, 102})
    assert 101 not in contributing_tokens(docs, labels, top_k=200, min_count=1, exclude={101, 102})


def test_wire_round_trip_and_checks():
    t = {"hidden": torch.randn(2, 3, 4), "attention_mask": torch.ones(2, 3, dtype=torch.int64)}
    spec = {"hidden": Expect(("F32",), (None, None, 4)), "attention_mask": Expect(("I64",), (None, None))}
    back = unpack(pack(t), spec)
    assert torch.equal(back["hidden"], t["hidden"]) and torch.equal(back["attention_mask"], t["attention_mask"])
    with pytest.raises(WireError, match="shape"):
        unpack(pack(t), {**spec, "hidden": Expect(("F32",), (None, None, 5))})
    with pytest.raises(WireError, match="not safetensors"):
        unpack(b"\x00" * 3, spec)


def test_step_lease_serialises_training_and_expires():
    top = SplitTop(2, 3, seed=0)
    service = TopService(top, lease_timeout=0.5, lease_wait=0.1)
    hidden, mask = torch.randn(2, 4, 384), torch.ones(2, 4, dtype=torch.int64)
    step, logits = service.forward(hidden, mask, train=True)
    with pytest.raises(WireError) as busy:
        service.forward(hidden, mask, train=True)
    assert busy.value.status == 503
    assert service.forward(hidden, mask, train=False)[0] is None  # inference never waits
    assert service.backward(step, torch.ones_like(logits)) is None and service.steps == 1
    stale, _ = service.forward(hidden, mask, train=True)
    time.sleep(0.6)  # abandoned: the next client reclaims the lease
    fresh, _ = service.forward(hidden, mask, train=True)
    with pytest.raises(WireError) as expired:
        service.backward(stale, torch.ones_like(logits))
    assert expired.value.status == 409
    service.backward(fresh, torch.ones_like(logits))
    assert service.steps == 2


def test_returned_input_gradient_matches_autograd():
    """What the server sends back for a trainable bottom is d(loss)/d(hidden) of an independent copy."""
    hidden, mask = torch.randn(3, 6, 384), torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    labels = torch.tensor([0, 2, 1])
    reference = SplitTop(1, 3, seed=0)
    h = hidden.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(reference.forward(h, mask), labels).backward()
    service = LocalTop(TopService(SplitTop(1, 3, seed=0)))
    step, logits = service.forward(hidden, mask, train=True, want_input_grad=True)
    logits = logits.requires_grad_(True)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    grad = service.backward(step, logits.grad)
    assert grad is not None and torch.allclose(grad, h.grad, atol=1e-6, rtol=1e-4)


def test_in_process_training_moves_the_top_adapter_and_lowers_the_loss():
    from privlora.data.text import load_tweets
    from privlora.split.train import train

    data = load_tweets(64)
    top = SplitTop(1, 3, seed=0)
    service = TopService(top, lr=5e-3)
    rows = train(SplitBottom(1), Privatizer("dchi", 400.0), LocalTop(service), data, steps=12, batch_size=16,
                 lr=1e-3, seed=0, generator=torch.Generator().manual_seed(0))
    assert service.steps == 12
    assert np.mean([r["loss"] for r in rows[-4:]]) < np.mean([r["loss"] for r in rows[:4]])
    moved = [p for n, p in top.model.named_parameters() if "lora_B" in n]
    assert len(moved) == 4 * 5 and all(float(p.detach().abs().sum()) > 0 for p in moved)
