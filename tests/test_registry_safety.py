"""Adapter safety checks from the bytes: pickles refused, headers validated against the base, spectrum scan."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from safetensors.torch import save

from privlora.registry.bases import base_shapes
from privlora.registry.safety import inspect_adapter

PREFIX = "base_model.model.bert.encoder.layer.0.attention.self."


def lora(rank: int = 4, n_out: int = 384, n_in: int = 384, layers=("query", "value"), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in layers:
        out[f"{PREFIX}{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=g)
        out[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=g)
    return out


BASE = {f"bert.encoder.layer.0.attention.self.{n}": (384, 384) for n in ("query", "key", "value")}


def test_a_real_text_adapter_passes(tmp_path):
    from privlora.tasks.text import TextClassificationTask

    task = TextClassificationTask(3)
    with torch.no_grad():
        for name, p in task.model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained-looking adapter (B starts at zero)
    task.save_adapter(tmp_path / "a")
    shapes = {n: tuple(m.base_layer.weight.shape) for n, m in task.model.named_modules() if hasattr(m, "base_layer")}
    report = inspect_adapter((tmp_path / "a" / "adapter_model.safetensors").read_bytes(), base_shapes=shapes)
    assert report.ok and report.rank == 8 and report.layers == 24, report
    assert report.warnings == []
    # the registry's MiniLM shapes, read from the weights file's header alone, are the model's own
    known, from_header = base_shapes(str(task.base))
    assert known == "minilm" and all(from_header[n] == s for n, s in shapes.items()), shapes
    assert inspect_adapter((tmp_path / "a" / "adapter_model.safetensors").read_bytes(), base_shapes=from_header).ok


def test_a_real_image_adapter_with_conv_loras_passes_against_the_embedded_base(tmp_path):
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import LoraSpec

    task = load_task("embedded", LoraSpec(rank=4, alpha=4, targets=("to_q", "to_k", "conv1", "conv2")), seed=0)
    with torch.no_grad():
        for name, p in task.model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    task.save_adapter(tmp_path / "a")
    data = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    shapes = {n: tuple(m.base_layer.weight.shape) for n, m in task.model.named_modules() if hasattr(m, "base_layer")}
    assert any(len(s) == 4 for s in shapes.values())  # convolutions among the LoRA layers
    known, from_header = base_shapes("embedded")
    assert known == "embedded" and all(from_header[n] == s for n, s in shapes.items())
    report = inspect_adapter(data, base_shapes=from_header)
    assert report.ok and report.rank == 4 and report.layers == len(shapes) and report.warnings == [], report
    # a rank-1 update planted in one conv layer is flagged like a linear one (ΔW flattened to out × in·kh·kw)
    from safetensors.torch import load

    state = load(data)
    key = next(k for k in state if k.endswith("conv1.lora_A.weight"))
    a = state[key]
    state[key] = a[:1].repeat(a.shape[0], 1, 1, 1)
    flagged = inspect_adapter(save(state), base_shapes=from_header)
    assert flagged.ok and len(flagged.warnings) == 1 and key.split(".lora_A")[0].removeprefix("base_model.model.") \
        in flagged.warnings[0], flagged.warnings


@pytest.mark.parametrize("payload, needle", [
    (pickle.dumps({"w": [1.0, 2.0]}), "pickle"),
    (b"not a tensor file", "not safetensors"),
])
def test_pickles_and_garbage_are_refused(payload, needle):
    report = inspect_adapter(payload)
    assert not report.ok and needle in report.errors[0]


def test_torch_save_zip_is_refused():
    buffer = io.BytesIO()
    torch.save(lora(), buffer)
    report = inspect_adapter(buffer.getvalue())
    assert not report.ok and "zip archive" in report.errors[0]


@pytest.mark.parametrize("state, needle", [
    ({k: v for k, v in lora().items() if "lora_B" not in k or "value" not in k}, "without its pair"),
    ({**lora(), f"{PREFIX}query.lora_A.weight": torch.zeros(4, 384, dtype=torch.int32)}, "not a float"),
    ({**lora(layers=("query",)), **{k.replace("query", "key"): v for k, v in lora(rank=2, layers=("query",)).items()}},
     "mixed LoRA ranks"),
    ({**lora(), "base_model.model.extra.weight": torch.zeros(2)}, "neither a LoRA tensor"),
    (lora(n_in=383), "the base layer is 384×384"),
    ({k.replace("self.query", "self.querry"): v for k, v in lora(layers=("query",)).items()}, "no such layer"),
    ({}, "no LoRA tensors"),
])
def test_malformed_adapters_are_refused_before_loading(state, needle):
    report = inspect_adapter(save(state) if state else save({"x": torch.zeros(1)}), base_shapes=BASE)
    assert not report.ok and any(needle in e for e in report.errors), report.errors


def test_spectrum_scan_flags_a_rank_one_update_in_a_rank_eight_adapter():
    state = lora(rank=8)
    u, v = torch.randn(384, 1), torch.randn(1, 384)
    state[f"{PREFIX}value.lora_A.weight"] = v.repeat(8, 1)  # every row the same direction: ΔW has rank 1
    state[f"{PREFIX}value.lora_B.weight"] = u.repeat(1, 8) / 8
    report = inspect_adapter(save(state), base_shapes=BASE)
    assert report.ok and len(report.warnings) == 1 and "value" in report.warnings[0], report.warnings
