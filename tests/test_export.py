"""``privlora export`` and the registry's ``?format=`` downloads on a tiny SD pipeline built from config.

The kohya file is judged by what a user does with it: diffusers' own ``pipe.load_lora_weights(path)`` must give
the same UNet output as loading the diffusers-format file, and both must differ from the base's output.
Nothing is downloaded; the run directory is written by privlora's own Task (``save_adapter``) with random
non-zero LoRA weights, so no training is needed to tell adapter from base.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_one_line_error, invoke_cli

ALPHA, RANK = 8.0, 4  # alpha ≠ rank: a file that loses the scale gives another output


# one intra-op thread for the module (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomize_lora(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _write_run(run: Path, base: str, task_kind: str = "image") -> Path:
    from privlora.config import DEFAULT_TARGETS
    from privlora.tasks.loading import load_task
    from privlora.tasks.lora import LoraSpec

    task = load_task(base, LoraSpec(rank=RANK, alpha=ALPHA, targets=DEFAULT_TARGETS), seed=0)
    _randomize_lora(task.model, seed=1)
    task.save_adapter(run / "adapter")
    (run / "config.yaml").write_text(f"task: {task_kind}\nbase: {base}\n")
    return run


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict[str, Path]:
    from test_sd import _tiny_pipeline

    tmp = tmp_path_factory.mktemp("export")
    _tiny_pipeline(tmp).save_pretrained(tmp / "pipe", safe_serialization=True)
    run = _write_run(tmp / "run", str(tmp / "pipe"))
    return {"pipe": tmp / "pipe", "run": run, "tmp": tmp}


def _export(run: Path, fmt: str, out: Path, *extra: str):
    return invoke_cli("export", str(run), "--format", fmt, "--out", str(out), *extra)


@torch.no_grad()
def _unet_out(pipe_dir: Path, lora_file: Path | None) -> torch.Tensor:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir), safety_checker=None)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))  # plain diffusers, no privlora involved
    g = torch.Generator().manual_seed(123)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    pipe.unet.eval()
    return pipe.unet(x, torch.tensor([10, 700]), encoder_hidden_states=states).sample


def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(sd):
    kohya, diffusers = sd["tmp"] / "kohya.safetensors", sd["tmp"] / "diffusers.safetensors"
    for fmt, out in (("kohya", kohya), ("diffusers", diffusers)):
        proc = _export(sd["run"], fmt, out)
        assert proc.returncode == 0, proc.stderr
    keys = set(load_file(str(kohya)))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert all(k.startswith("lora_unet_") for k in keys)
    base = _unet_out(sd["pipe"], None)
    from_kohya, from_diffusers = _unet_out(sd["pipe"], kohya), _unet_out(sd["pipe"], diffusers)
    assert (from_diffusers - base).abs().max() > 1e-3
    assert (from_kohya - base).abs().max() > 1e-3
    torch.testing.assert_close(from_kohya, from_diffusers, rtol=0, atol=1e-5)


def test_header_records_provenance_and_kohya_keys(sd):
    import hashlib

    out = sd["tmp"] / "meta.safetensors"
    assert _export(sd["run"], "kohya", out).returncode == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        alpha = f.get_tensor(next(k for k in f.keys() if k.endswith(".alpha")))
    source = hashlib.sha256((sd["run"] / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert meta["privlora_source_sha256"] == source
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["privlora_rank"] == str(RANK) and float(meta["privlora_alpha"]) == ALPHA
    assert meta["privlora_base"] == str(sd["pipe"]) and meta["privlora_version"]
    assert alpha.shape == () and float(alpha) == ALPHA


def test_peft_export_loads_with_peft(sd):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    out = sd["tmp"] / "peft.safetensors"
    assert _export(sd["run"], "peft", out).returncode == 0
    with safe_open(str(out), framework="pt") as f:
        config = LoraConfig(**{k: v for k, v in json.loads(f.metadata()["privlora_adapter_config"]).items()
                               if k in LoraConfig.__dataclass_fields__ and k != "peft_type"})
    unet = UNet2DConditionModel.from_pretrained(str(sd["pipe"]), subfolder="unet")
    inject_adapter_in_model(config, unet)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(out)).items()}
    result = set_peft_model_state_dict(unet, state)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    ours = {k: v for k, v in unet.state_dict().items() if "lora_" in k}
    stored = load_file(str(sd["run"] / "adapter" / "adapter_model.safetensors"))
    assert len(ours) == len(stored)
    for key, value in stored.items():
        module, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
        torch.testing.assert_close(ours[f"{module}.lora_{rest.replace('.weight', '.default.weight')}"], value)


def test_existing_out_needs_force(sd):
    out = sd["tmp"] / "exists.safetensors"
    out.write_bytes(b"keep me")
    assert_one_line_error(_export(sd["run"], "kohya", out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert _export(sd["run"], "kohya", out, "--force").returncode == 0
    assert "lora_unet_" in next(iter(load_file(str(out))))
    assert not list(out.parent.glob(".*.tmp"))


def test_bad_run_dir_is_one_line(tmp_path):
    out = tmp_path / "x.safetensors"
    assert_one_line_error(_export(tmp_path / "missing", "kohya", out), "does not exist")
    (tmp_path / "norun").mkdir()
    assert_one_line_error(_export(tmp_path / "norun", "kohya", out), "not a run directory")
    assert_one_line_error(invoke_cli("export", str(tmp_path), "--format", "a1111", "--out", str(out)), "--format")
    assert not out.exists()


def test_pickle_adapter_is_refused(sd, tmp_path):
    run = tmp_path / "pickled"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text((sd["run"] / "config.yaml").read_text())
    (run / "adapter" / "adapter_config.json").write_text((sd["run"] / "adapter" / "adapter_config.json").read_text())
    state = load_file(str(sd["run"] / "adapter" / "adapter_model.safetensors"))
    torch.save(state, run / "adapter" / "adapter_model.bin")
    out = tmp_path / "x.safetensors"
    assert_one_line_error(_export(run, "kohya", out), "pickle")
    (run / "adapter" / "adapter_model.bin").rename(run / "adapter" / "adapter_model.safetensors")  # pickle bytes
    assert_one_line_error(_export(run, "diffusers", out), "pickle")
    assert not out.exists()


def test_text_runs_export_as_peft_only(tmp_path):
    from safetensors.torch import save_file

    run = tmp_path / "text"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("task: text\nbase: minilm\n")
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "task_type": "SEQ_CLS", "target_modules": ["query"], "peft_type": "LORA"}))
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
    save_file({f"{prefix}.lora_A.weight": torch.randn(4, 8), f"{prefix}.lora_B.weight": torch.randn(8, 4)},
              str(run / "adapter" / "adapter_model.safetensors"))
    for fmt in ("kohya", "diffusers"):
        assert_one_line_error(_export(run, fmt, tmp_path / f"{fmt}.safetensors"), "peft only")
    assert _export(run, "peft", tmp_path / "peft.safetensors").returncode == 0
    assert set(load_file(str(tmp_path / "peft.safetensors"))) == {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"}


def test_embedded_unet2d_refuses_kohya_and_exports_diffusers(tmp_path):
    run = _write_run(tmp_path / "embedded", "embedded")
    assert_one_line_error(_export(run, "kohya", tmp_path / "k.safetensors"), "UNet2DModel", "diffusers")
    assert not (tmp_path / "k.safetensors").exists()
    assert _export(run, "diffusers", tmp_path / "d.safetensors").returncode == 0
    theirs = load_file(str(tmp_path / "d.safetensors"))
    ours = load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))  # what training writes
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_kind_from_layer_names_when_the_base_is_not_on_disk():
    from privlora.export import classify

    sd_keys = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    unet2d_keys = ["down_blocks.1.attentions.0.to_q.lora_A.weight"]
    somewhere = {"base_model_name_or_path": "/elsewhere/model"}
    assert classify(somewhere, sd_keys, probe_base=False) == "sd"
    assert classify(somewhere, unet2d_keys, probe_base=False) == "unet2d"
    assert classify({"base_model_name_or_path": "embedded"}, sd_keys) == "unet2d"
    assert classify({"task_type": "SEQ_CLS"}, sd_keys) == "text"
    assert classify({}, ["bert.encoder.layer.0.attention.self.query.lora_A.weight"]) == "other"
    assert classify({"base_model_name_or_path": "x" * 5000 + "\0"}, sd_keys) == "sd"  # no OSError/ValueError


def test_cli_choices_are_the_library_formats():
    from privlora.cli.choices import EXPORT_FORMATS
    from privlora.export import FORMATS

    assert set(EXPORT_FORMATS) == set(FORMATS)


# --- the registry serves each format ---------------------------------------------------------------------

def test_registry_download_in_each_format(sd, tmp_path):
    from safetensors.torch import load, save

    from privlora.registry.service import Registry
    from test_registry_server import auth, start_server

    root = tmp_path / "registry"
    admin = Registry(root).bootstrap_admin("root")
    proc, url = start_server(root, "--audit-attacks", "")  # only the auditor's audit counts for the export
    tokens = {}

    def call(who: str, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, url + path, headers=auth(tokens.get(who, admin)), timeout=60, **kw)

    try:
        for name, role in (("ana", "researcher"), ("rex", "researcher"), ("aud", "auditor")):
            tokens[name] = call("root", "POST", "/users", json={"name": name, "role": role}).json()["token"]
        adapter = sd["run"] / "adapter"
        stored = (adapter / "adapter_model.safetensors").read_bytes()
        body = {"name": "sd", "weights_b64": base64.b64encode(stored).decode(), "privacy": {"mechanism": "none"},
                "config": json.loads((adapter / "adapter_config.json").read_text())}
        pushed = call("ana", "POST", "/adapters", json=body)
        assert pushed.status_code == 200, pushed.text
        adapter_id = pushed.json()["id"]
        assert _export(sd["run"], "kohya", tmp_path / "local.safetensors").returncode == 0
        local = load_file(str(tmp_path / "local.safetensors"))

        weights = f"/adapters/{adapter_id}/weights"
        default = call("ana", "GET", weights)
        assert default.status_code == 200 and default.content == stored  # today's answer, byte for byte
        assert call("ana", "GET", weights, params={"format": "peft"}).content == stored
        kohya = call("ana", "GET", weights, params={"format": "kohya"})
        assert kohya.status_code == 200, kohya.text
        served = load(kohya.content)
        assert served.keys() == local.keys() and all(torch.equal(served[k], local[k]) for k in local)
        assert kohya.content == (tmp_path / "local.safetensors").read_bytes()  # same bytes in every process
        diffusers = call("ana", "GET", weights, params={"format": "diffusers"})
        assert diffusers.status_code == 200 and all(k.startswith("unet.") for k in load(diffusers.content))
        bogus = call("ana", "GET", weights, params={"format": "bogus"})
        assert bogus.status_code == 422 and "bogus" in bogus.json()["error"]

        results = {"attacks": {"loss": {"adapter": {"auc": 0.5}, "base_control": {"auc": 0.5}}}}
        assert call("aud", "POST", f"/adapters/{adapter_id}/audit", json=results).status_code == 200
        export = call("ana", "POST", "/exports", json={"adapter": adapter_id}).json()["export"]
        assert call("rex", "POST", f"/exports/{export}/approve").status_code == 200
        download = f"/exports/{export}/download"
        assert call("ana", "GET", download, params={"format": "bogus"}).status_code == 422
        exported = call("ana", "GET", download, params={"format": "kohya"})
        assert exported.status_code == 200 and exported.content == kohya.content

        g = torch.Generator().manual_seed(0)
        prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
        text = save({f"{prefix}.lora_A.weight": torch.randn(4, 384, generator=g),
                     f"{prefix}.lora_B.weight": torch.randn(384, 4, generator=g)})
        text_id = call("ana", "POST", "/adapters", json={"name": "t", "weights_b64": base64.b64encode(text).decode(),
                                                         "config": {"r": 4, "lora_alpha": 8}}).json()["id"]
        refused = call("ana", "GET", f"/adapters/{text_id}/weights", params={"format": "kohya"})
        assert refused.status_code == 422 and "peft only" in refused.json()["error"]

        pulled = invoke_cli("registry", "pull", adapter_id, "--format", "kohya", "--out", str(tmp_path / "p.st"),
                            "--url", url, "--token", tokens["ana"])
        assert pulled.returncode == 0, pulled.stderr
        assert (tmp_path / "p.st").read_bytes() == kohya.content
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
