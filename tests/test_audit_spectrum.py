"""LoRA spectrum: singular values from the QR factors equal those of the explicit ΔW (peft's own, for a real
run; hand-built for known ranks), the figures follow, pickle is refused, and the plot is a PNG."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import CONFIGS, FAST, assert_one_line_error, run_cli
from privlora.audit.spectrum import adapter_spectrum, singular_values, spectrum_plot, spectrum_stats
from privlora.tasks.lora import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spectrum") / "run"
    proc = run_cli("train", "--config", str(CONFIGS / "demo-plain.yaml"), "--max-steps", "3", "--batch-size", "4",
                   "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    return out


def _write_adapter(folder: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], *, r: int,
                   alpha: float, **extra: object) -> Path:
    """A peft-format adapter directory written by hand."""
    folder.mkdir(parents=True)
    tensors = {}
    for name, (a, b) in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / PEFT_WEIGHTS))
    (folder / PEFT_CONFIG).write_text(json.dumps({"r": r, "lora_alpha": alpha, "peft_type": "LORA",
                                                  "target_modules": ["x"], **extra}))
    return folder


def _explicit_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW as peft merges it: linear ``B @ A``; conv ``conv(Aᵀ, B)ᵀ`` → ``[out, in, k, k]``."""
    if a.dim() == 2:
        return scale * b.double() @ a.double()
    w = torch.nn.functional.conv2d(a.double().transpose(0, 1), b.double()).transpose(0, 1)
    return scale * w


def test_real_adapter_matches_peft_delta_weight(real_run):
    """Every layer of a trained adapter: σ(QR core) == svdvals(peft's get_delta_weight reshaped to 2-D)."""
    from peft.tuners.lora import LoraLayer

    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import read_spec

    spectrum = adapter_spectrum(real_run)
    assert spectrum["adapter"] == str(real_run / "adapter")
    task = load_task("embedded", read_spec(real_run / "adapter"), seed=0)
    task.load_adapter(real_run / "adapter")
    peft_layers = {name: m for name, m in task.model.named_modules() if isinstance(m, LoraLayer)}
    assert set(spectrum["layers"]) == set(peft_layers)
    kinds = set()
    for name, layer in peft_layers.items():
        with torch.no_grad():
            delta = layer.get_delta_weight("default").double()
        expected = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        got = spectrum["layers"][name]
        kinds.add(got["kind"])
        assert got["shape"] == list(delta.shape)
        sigma = torch.tensor(got["singular_values"], dtype=torch.float64)
        k = min(sigma.numel(), expected.numel())
        assert torch.allclose(sigma[:k], expected[:k], rtol=1e-6, atol=1e-9 * float(expected[0]))
        tail = expected[k:]
        assert tail.numel() == 0 or float(tail.abs().max()) <= 1e-6 * float(expected[0])  # ΔW has rank ≤ r
        assert got["frobenius"] == pytest.approx(float(delta.norm()), rel=1e-6)
    assert kinds == {"linear", "conv"}
    summary = spectrum["summary"]
    assert summary["layers"] == len(peft_layers) and summary["zero_layers"] == 0
    assert 1.0 <= summary["mean_effective_rank"] <= spectrum["rank"]


@pytest.mark.parametrize("conv", [False, True])
def test_random_layers_match_explicit_svd(conv):
    g = torch.Generator().manual_seed(0)
    r, out, inp = 6, 20, 9
    a = torch.randn((r, inp, 3, 3) if conv else (r, inp), generator=g)
    b = torch.randn((out, r, 1, 1) if conv else (out, r), generator=g)
    delta = _explicit_delta(a, b, 0.5)
    expected = torch.linalg.svdvals(delta.reshape(out, -1))[:r]
    assert torch.allclose(singular_values(a, b, 0.5), expected, rtol=1e-9)
    # rank larger than a side: out = 4 < r
    b_small = torch.randn((4, r), generator=g)
    a_lin = torch.randn((r, 30), generator=g)
    expected = torch.linalg.svdvals(_explicit_delta(a_lin, b_small, 2.0))
    assert torch.allclose(singular_values(a_lin, b_small, 2.0), expected, rtol=1e-9)


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q


def test_known_spectra(tmp_path):
    """Rank-1 ΔW: effective rank 1, top-1 share 1, flagged. Equal σ: effective rank r. B = 0: zero, not flagged."""
    r, alpha = 4, 8.0  # scale 2
    u, v = _orthonormal(16, r, 1), _orthonormal(10 * 9, r, 2)
    rank1_b = torch.zeros(16, r, dtype=torch.float64)
    rank1_b[:, 0] = u[:, 0] * 3.0
    equal_conv_a = v.T.reshape(r, 10, 3, 3)  # rows orthonormal → σ(ΔW) = 2·σ(B) = 2·[1, 1, 1, 1]
    equal_conv_b = u.reshape(16, r, 1, 1)
    layers = {
        "blk.rank1": (torch.randn(r, 12, dtype=torch.float64), rank1_b),
        "blk.equal_conv": (equal_conv_a, equal_conv_b),
        "blk.zero": (torch.randn(r, 12, dtype=torch.float64), torch.zeros(7, r, dtype=torch.float64)),
    }
    spectrum = adapter_spectrum(_write_adapter(tmp_path / "a", layers, r=r, alpha=alpha), top_k=2)
    one, equal, zero = (spectrum["layers"][k] for k in ("blk.rank1", "blk.equal_conv", "blk.zero"))
    assert one["effective_rank"] == pytest.approx(1.0, abs=1e-9)
    assert one["energy_top1"] == pytest.approx(1.0, abs=1e-12) and one["suspicious"]
    assert one["stable_rank"] == pytest.approx(1.0, abs=1e-9)
    assert equal["kind"] == "conv" and equal["shape"] == [16, 10, 3, 3]
    assert equal["singular_values"] == pytest.approx([2.0] * r, rel=1e-9)
    assert equal["effective_rank"] == pytest.approx(r, rel=1e-9)
    assert equal["energy_top1"] == pytest.approx(1 / r) and equal["energy_topk"] == pytest.approx(2 / r)
    assert not equal["suspicious"] and equal["frobenius"] == pytest.approx(2.0 * math.sqrt(r))
    assert zero["zero"] and zero["energy_top1"] is None and not zero["suspicious"]
    s = spectrum["summary"]
    assert s["suspicious_layers"] == ["blk.rank1"] and s["suspicious"] and s["zero_layers"] == 1
    assert s["mean_effective_rank"] == pytest.approx((1 + r) / 2)
    # peft's per-layer alpha_pattern and rsLoRA scaling (α/√r)
    patterned = adapter_spectrum(_write_adapter(tmp_path / "b", layers, r=r, alpha=alpha, use_rslora=True,
                                                alpha_pattern={"equal_conv": 1.0}))
    assert patterned["layers"]["blk.equal_conv"]["scale"] == pytest.approx(1.0 / 2)
    assert patterned["layers"]["blk.rank1"]["scale"] == pytest.approx(alpha / 2)


def test_effective_rank_is_roy_vetterli():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = sigma[:3] / sigma.sum()
    assert spectrum_stats(sigma)["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_cli_table_plot_and_json(real_run, tmp_path):
    hand = _write_adapter(tmp_path / "hand", {"x.to_q": (torch.randn(2, 8), torch.randn(8, 2))}, r=2, alpha=2)
    png, js = tmp_path / "fig" / "spectrum.png", tmp_path / "spectrum.json"
    proc = run_cli("spectrum", str(real_run), str(hand), "--out", str(png), "--json", str(js))
    assert proc.returncode == 0, proc.stderr
    assert f"{real_run}:" in proc.stdout and "mean effective rank" in proc.stdout and "suspicious layers" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.size[0] > 400 and img.size[1] > 200
    saved = json.loads(js.read_text())
    assert list(saved) == [str(real_run), str(hand)]
    assert saved[str(hand)]["layers"]["x.to_q"]["rank"] == 2
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_plot_from_the_library(tmp_path):
    layers = {"a.to_k": (torch.randn(3, 5), torch.randn(6, 3))}
    spectra = {"one": adapter_spectrum(_write_adapter(tmp_path / "one", layers, r=3, alpha=3))}
    path = spectrum_plot(spectra, tmp_path / "p.png")
    with Image.open(path) as img:
        assert img.format == "PNG"


def test_refuses_pickle_and_missing(tmp_path):
    assert_one_line_error(run_cli("spectrum", str(tmp_path / "missing")), "does not exist")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / PEFT_CONFIG).write_text(json.dumps({"r": 2, "lora_alpha": 2}))
    with (pickled / "adapter_model.bin").open("wb") as f:
        pickle.dump({"x.lora_A.weight": torch.zeros(2, 2)}, f)
    assert_one_line_error(run_cli("spectrum", str(pickled)), "pickle")
    assert_one_line_error(run_cli("spectrum", str(pickled / "adapter_model.bin")), "pickle")
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    (disguised / PEFT_CONFIG).write_text(json.dumps({"r": 2, "lora_alpha": 2}))
    (disguised / PEFT_WEIGHTS).write_bytes((pickled / "adapter_model.bin").read_bytes())
    assert_one_line_error(run_cli("spectrum", str(disguised)), "safetensors")
