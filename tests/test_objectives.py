"""MP-LoRA and SMP-LoRA (Luo et al. 2024): the objectives combine exactly as the paper writes them, and
the proxy attacker they play against really learns to tell members from non-members."""

from __future__ import annotations

import pytest
import torch

from privlora.config import MPOptions, TrainConfig
from privlora.data.imageset import ImageSet
from privlora.errors import UserError
from privlora.train.objectives import OBJECTIVES, MPObjective, Objective, ProxyAttacker, SMPObjective

SHAPE = (1, 4, 4)  # a tiny "error map": 16 attack features




class FakeTask:
    """Stands in for a DiffusionTask: a batch's squared-error map is simply its pixels, so the attacker's
    inputs are known exactly and no UNet runs."""

    device = torch.device("cpu")

    def sample_shape(self) -> tuple[int, int, int]:
        return SHAPE

    def squared_error(self, batch, generator=None, timesteps=None) -> torch.Tensor:
        return batch["pixels"]

    def attack_features(self, batch, generator=None) -> torch.Tensor:
        return batch["pixels"].flatten(1)

    def adaptation_and_features(self, batch, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        errors = batch["pixels"].flatten(1)
        return errors.mean(), errors


def _images(pixels: torch.Tensor, prefix: str) -> ImageSet:
    ids = [f"{prefix}/{i}" for i in range(pixels.shape[0])]
    return ImageSet(ids=ids, pixels=pixels, captions=[""] * len(ids))


def _separable(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' features centred at +0.5, non-members' at −0.5 (unit noise): linearly separable on average."""
    members = torch.randn((n, *SHAPE), generator=gen) + 0.5
    others = torch.randn((n, *SHAPE), generator=gen) - 0.5
    return members, others


def _objective(cls, options: MPOptions, batch_size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    members, others = _separable(64, gen)
    torch.manual_seed(seed)  # the attacker's initial weights
    return cls(FakeTask(), members=_images(members, "m"), aux=_images(others, "a"), options=options,
               batch_size=batch_size)


def test_defaults_are_the_papers():
    options = MPOptions()
    assert options.alpha == 1.0 and options.beta == 1.0
    assert TrainConfig().mp == options
    assert options.hidden == (512, 256)
    attacker = ProxyAttacker(16, options.hidden)
    linears = [m for m in attacker.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 512), (512, 256), (256, 2)]
    assert [m.p for m in attacker.modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    assert OBJECTIVES["mp"] is MPObjective and OBJECTIVES["smp"] is SMPObjective
    assert OBJECTIVES["plain"] is Objective and OBJECTIVES["dp"] is Objective


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.3, 2.5), (0.0, 0.7)])
@pytest.mark.parametrize(("adaptation", "attack"), [(0.3, 0.8), (0.05, 0.69), (1.7, 0.0)])
def test_combine_is_the_papers_formula(alpha, beta, adaptation, attack):
    options = MPOptions(alpha=alpha, beta=beta)
    ada, att = torch.tensor(adaptation, dtype=torch.float64), torch.tensor(attack, dtype=torch.float64)
    mp = _objective(MPObjective, options).combine(ada, att)
    smp = _objective(SMPObjective, options).combine(ada, att)
    assert mp.item() == pytest.approx(adaptation - alpha * attack, rel=1e-12, abs=1e-15)
    assert smp.item() == pytest.approx(adaptation / (beta + alpha * attack + 1e-5), rel=1e-12)


def test_gradients_push_the_attacker_loss_up():
    """∂/∂L_att: −α for MP; −α·L_ada/(β + α·L_att + 1e-5)² for SMP (the LoRA wants the attacker to fail)."""
    alpha, beta, adaptation, attack = 0.6, 1.4, 0.2, 0.9
    options = MPOptions(alpha=alpha, beta=beta)
    for cls, expected in ((MPObjective, -alpha),
                          (SMPObjective, -alpha * adaptation / (beta + alpha * attack + 1e-5) ** 2)):
        ada = torch.tensor(adaptation, dtype=torch.float64, requires_grad=True)
        att = torch.tensor(attack, dtype=torch.float64, requires_grad=True)
        _objective(cls, options).combine(ada, att).backward()
        assert att.grad.item() == pytest.approx(expected, rel=1e-9)
        assert ada.grad.item() > 0


@pytest.mark.parametrize("cls", [MPObjective, SMPObjective])
def test_step_loss_matches_hand_computation(cls):
    alpha, beta = 0.8, 1.5
    objective = _objective(cls, MPOptions(alpha=alpha, beta=beta))
    objective.attacker.eval()  # no dropout, so the hand computation sees the same logits
    errors = torch.linspace(0.0, 2.0, 3 * 16).reshape(3, *SHAPE) ** 2
    result = objective.step_loss({"pixels": errors}, torch.Generator().manual_seed(0))

    flat = errors.flatten(1)
    adaptation = flat.sum() / flat.numel()
    with torch.no_grad():
        logits = objective.attacker(flat)
    attack = (torch.logsumexp(logits, dim=1) - logits[:, 1]).mean()  # cross-entropy with label "member"
    if cls is MPObjective:
        expected = adaptation - alpha * attack
    else:
        expected = adaptation / (beta + alpha * attack + 1e-5)
    torch.testing.assert_close(result.loss.detach(), expected)
    assert result.logs["loss"] == pytest.approx(adaptation.item(), rel=1e-6)
    assert result.logs["attacker_loss_members"] == pytest.approx(attack.item(), rel=1e-5)
    assert result.logs["objective"] == pytest.approx(expected.item(), rel=1e-5)


def test_min_max_needs_auxiliary_non_members():
    empty = _images(torch.zeros((0, *SHAPE)), "a")
    with pytest.raises(UserError, match="aux"):
        SMPObjective(FakeTask(), members=_images(torch.zeros((4, *SHAPE)), "m"), aux=empty,
                     options=MPOptions(), batch_size=4)


def _attacker_quality(objective, members: torch.Tensor, others: torch.Tensor) -> tuple[float, float]:
    """Held-out cross-entropy and accuracy of the attacker (eval mode), members labelled 1."""
    feats = torch.cat([members.flatten(1), others.flatten(1)])
    labels = torch.cat([torch.ones(len(members)), torch.zeros(len(others))]).long()
    objective.attacker.eval()
    with torch.no_grad():
        logits = objective.attacker(feats)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("cls", [MPObjective, SMPObjective])
def test_proxy_attacker_learns_to_tell_members_apart(cls):
    options = MPOptions(attacker_lr=1e-3, attacker_steps=3)
    objective = _objective(cls, options, batch_size=16)
    held_members, held_others = _separable(200, torch.Generator().manual_seed(99))
    loss_before, acc_before = _attacker_quality(objective, held_members, held_others)

    gen = torch.Generator().manual_seed(1)
    calls = 20
    logs = [objective.after_step(gen) for _ in range(calls)]
    loss_after, acc_after = _attacker_quality(objective, held_members, held_others)

    assert loss_after < loss_before - 0.1, (loss_before, loss_after)
    assert acc_after >= 0.85 and acc_after > acc_before, (acc_before, acc_after)
    assert logs[-1]["attacker_loss"] < logs[0]["attacker_loss"]
    assert set(logs[-1]) == {"attacker_loss", "attacker_acc"}
    # k attacker updates per LoRA step, no more, no fewer
    steps = [int(s["step"]) for s in objective.attacker_opt.state_dict()["state"].values()]
    assert steps and all(s == calls * options.attacker_steps for s in steps)


def test_attacker_state_round_trips_for_resume():
    options = MPOptions(attacker_lr=1e-3)
    trained = _objective(SMPObjective, options, batch_size=8)
    trained.after_step(torch.Generator().manual_seed(0))
    fresh = _objective(SMPObjective, options, batch_size=8, seed=5)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(5, 16)
    trained.attacker.eval()
    fresh.attacker.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.attacker(x), trained.attacker(x), rtol=0, atol=0)
    assert fresh.attacker_opt.state_dict()["state"][0]["step"] == 1
