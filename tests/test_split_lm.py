"""Split learning of a causal LM (``task: causal-lm``): the user keeps embeddings, the first blocks and the LM
head, the provider runs the middle blocks with LoRA. Checked: the halves compose to the full model, training
through the real service lowers the loss and the provider's adapter loads with plain peft on the plain base,
the wire protocol carries ``[B, T, H]`` both ways (a wrong gradient shape is a 422), and — on a really started
``privlora split serve --task causal-lm`` — ``privlora split train --task causal-lm`` end to end."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from pydantic import ValidationError

from conftest import assert_one_line_error, invoke_cli
from privlora.config import SplitConfig
from privlora.data.instructions import load_instruction_dataset
from privlora.errors import UserError
from privlora.split.lm_models import LMSplitBottom, LMSplitTop, public_input_clip
from privlora.split.lm_run import lm_evaluate, lm_train_step
from privlora.split.privatizers import Privatizer
from privlora.split.service import LocalTop, TopService
from privlora.split.wire import WireError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOKEN = "lm-split-token-51c"


@pytest.fixture(scope="module")
def records():
    return load_instruction_dataset("demo:support", limit=24)


@pytest.mark.parametrize("depth", [0, 2])
def test_the_halves_compose_to_the_full_model(records, depth):
    from privlora.tasks.causal_lm import CausalLMTask

    bottom = LMSplitBottom(depth)
    top = LMSplitTop(depth, input_clip=None)
    full = CausalLMTask("embedded-lm", seed=0)  # LoRA B = 0: the plain base
    encoded = bottom.encode(records.batch(list(range(6))))
    with torch.no_grad():
        split = bottom.head(top.forward(bottom.forward(encoded["input_ids"], encoded["attention_mask"]),
                                        encoded["attention_mask"]))
        whole = full.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    mask = encoded["attention_mask"].bool()
    torch.testing.assert_close(split[mask], whole[mask], atol=1e-4, rtol=1e-4)
    assert len(top.blocks) + depth == len(full.model.transformer.h) and len(bottom.model.transformer.h) == depth


def test_public_clip_spares_clean_states_and_cuts_noised_ones(records):
    bottom = LMSplitBottom(1)
    clip = public_input_clip(1)
    encoded = bottom.encode(records.batch(list(range(len(records)))))
    with torch.no_grad():
        clean = bottom.forward(encoded["input_ids"], encoded["attention_mask"])
    norms = clean.norm(dim=-1)[encoded["attention_mask"].bool()]
    assert float(norms.max()) < clip  # the user's clean states (not seen by the provider) pass untouched
    noised = Privatizer("dchi", 1.0)(clean, encoded["input_ids"], torch.Generator().manual_seed(0))
    assert float(noised.norm(dim=-1).median()) > clip  # η = 1: noise norm ≈ H = 128 ≫ the clip


def test_training_through_the_service_learns_and_the_adapter_loads_in_plain_peft(records, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from privlora.tasks.embedded_lm import embedded_lm_path

    depth = 1
    bottom, none = LMSplitBottom(depth), Privatizer("none")
    service = TopService(LMSplitTop(depth), lr=0.02, base_name="embedded-lm")
    top, generator = LocalTop(service), torch.Generator().manual_seed(0)
    before = lm_evaluate(bottom, none, top, records, batch_size=8, generator=generator)
    losses = [lm_train_step(bottom, none, top, records.batch(list(range(k % 3 * 8, k % 3 * 8 + 8))), generator)
              for k in range(12)]
    after = lm_evaluate(bottom, none, top, records, batch_size=8, generator=generator)
    assert service.steps == 12 and after["loss"] < before["loss"] - 0.3, (before, after, losses)
    saved = service.save(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and saved["steps"] == 12
    assert all(f"h.{i}." in m for m in config["target_modules"] for i in [int(m.split(".")[2])]) and \
        min(int(m.split(".")[2]) for m in config["target_modules"]) == depth  # only the provider's blocks
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_lm_path()),
                                      str(tmp_path / "adapter")).eval()
    encoded = bottom.encode(records.batch([0, 1, 2]))
    with torch.no_grad():
        want = plain(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
        got = bottom.head(top.forward(bottom.forward(encoded["input_ids"], encoded["attention_mask"]),
                                      encoded["attention_mask"], train=False)[1])
    mask = encoded["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)


def test_the_wire_shapes_are_hidden_states_both_ways(records):
    service = TopService(LMSplitTop(1, input_clip=None), base_name="embedded-lm")
    assert service.info()["task"] == "causal-lm" and service.info()["num_labels"] is None
    hidden = torch.zeros(2, 7, service.top.hidden_size)
    step, out = service.forward(hidden, torch.ones(2, 7, dtype=torch.long), train=True)
    assert tuple(out.shape) == (2, 7, service.top.hidden_size)
    assert service.backward_spec(2)["grad_logits"].shape == (2, None, service.top.hidden_size)
    with pytest.raises(WireError) as refused:
        service.backward(step, torch.zeros(2, 6, service.top.hidden_size))
    assert refused.value.status == 422


def test_config_defaults_and_refusals():
    cfg = SplitConfig.model_validate({"task": "causal-lm"})
    assert (cfg.base, cfg.data.source, cfg.privatizer.name) == ("embedded-lm", "demo:support", "dchi")
    assert SplitConfig.model_validate({}).privatizer.name == "cti"  # the text split is untouched
    with pytest.raises(ValidationError, match="no labels"):
        SplitConfig.model_validate({"task": "causal-lm", "privatizer": {"name": "cti"}})
    with pytest.raises(ValidationError, match="frozen"):
        SplitConfig.model_validate({"task": "causal-lm", "bottom": "trainable"})
    with pytest.raises(UserError, match="GPT-2-family"):
        from privlora.split.lm_models import _gpt2

        class NotGpt2:
            model_type, base = "llama", "x"

        _gpt2(NotGpt2(), 0)  # type: ignore[arg-type]


@pytest.mark.slow
def test_split_serve_and_train_commands_for_a_causal_lm(tmp_path):
    from test_split_server import start_server

    out = tmp_path / "server" / "adapter"
    proc, url = start_server("--task", "causal-lm", "--depth", "1", "--out", str(out), "--lr", "0.01", token=TOKEN)
    try:
        env = {"PRIVLORA_SPLIT_TOKEN": TOKEN}
        run_dir = tmp_path / "run"
        trained = invoke_cli("split", "train", "--task", "causal-lm", "--server", url, "--limit", "40", "--steps",
                             "4", "--batch-size", "8", "--out", str(run_dir), "-q", env=env)
        assert trained.returncode == 0, (trained.stdout, trained.stderr)
        summary = json.loads((run_dir / "split.json").read_text())
        assert summary["task"] == "causal-lm" and summary["privatizer"]["name"] == "dchi"
        assert summary["train_records"] + summary["eval_records"] == 40 and summary["eval_perplexity"] > 1
        assert f"held-out perplexity {summary['eval_perplexity']:.1f}" in trained.stdout
        assert httpx.get(url + "/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()["steps"] == 4
        # a text client against the LM server, and split predict on an LM run: one line each, exit 2
        assert_one_line_error(invoke_cli("split", "train", "--server", url, "--limit", "40", "--steps", "1",
                                      "--out", str(tmp_path / "text"), env=env), "causal-lm")
        assert_one_line_error(invoke_cli("split", "predict", "hello", "--run", str(run_dir), "--server", url,
                                      env=env), "split classifier")
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert (out / "adapter_config.json").exists()  # SIGTERM saved what was trained


def test_the_servers_inversion_reads_clean_states_and_dchi_noise_hides_tokens(records):
    """The white-box server's EIA (eia_optimize through the bottom's real block, from the residual nearest-neighbour
    guess): depth 0 clean states are inverted exactly; behind one block the optimisation recovers nearly every
    token of clean states, far fewer under dχ noise as large as the states (η = 6: noise norm 21 ≈ a state's)."""
    from privlora.split.attacks import eia_optimize, token_recovery

    batch = records.batch([0, 1, 2, 3])
    for depth in (0, 1):
        bottom = LMSplitBottom(depth)
        encoded = bottom.encode(batch)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        with torch.no_grad():
            clean = bottom.forward(ids, mask)
        if depth == 0:
            assert token_recovery(bottom.nearest_tokens(clean, mask), ids, mask, bottom.special_ids) == 1.0
            continue
        found = {}
        for eta in (None, 6.0):
            observed = clean if eta is None else Privatizer("dchi", eta)(clean, ids, torch.Generator().manual_seed(0))
            guess = bottom.nearest_tokens(observed, mask)
            out = eia_optimize(bottom, observed, mask, init=guess, steps=60, generator=torch.Generator().manual_seed(0))
            found[eta] = token_recovery(out, ids, mask, bottom.special_ids)
        assert found[None] > 0.9 and found[6.0] < found[None] - 0.3, found
