"""``task: causal-lm`` (issue 24): the embedded tiny LM, CausalLMTask, instruction data, and training through the
one loop in plain and DP mode."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from privlora.config import load_config
from privlora.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"data.limit": 40, "data.members": 0.5, "data.aux": 0.2, "data.eval": 0.3, "optim.batch_size": 8,
        "optim.max_steps": 3, "quiet": True, "log_every": 1}


@pytest.fixture(scope="module")
def task():
    from privlora.tasks.causal_lm import CausalLMTask

    return CausalLMTask("embedded-lm", seed=0)


@pytest.fixture(scope="module")
def data():
    from privlora.data.instructions import load_instruction_dataset

    return load_instruction_dataset("demo:support", limit=40)


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _train(tmp_path, name, **overrides):
    from privlora.train.loop import train

    config = load_config(None, {"task": "causal-lm", "out": str(tmp_path / name), **FAST, **overrides})
    return train(config)


def test_config_defaults_name_the_embedded_lm_and_demo_support():
    config = load_config(None, {"task": "causal-lm"})
    assert (config.base, config.data.source, config.lora.targets) == ("embedded-lm", "demo:support", ("auto",))


def test_plain_training_moves_lora_and_adapter_loads_in_plain_peft(tmp_path, data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from privlora.tasks.causal_lm import CausalLMTask
    from privlora.tasks.embedded_lm import embedded_lm_path
    from privlora.tasks.lora import read_spec

    result = _train(tmp_path, "plain", **{"optim.lr": 0.01})
    adapter = result.run_dir / "adapter"
    utility = json.loads((result.run_dir / "utility.json").read_text())
    assert utility["perplexity_heldout"] > 1 and utility["base_perplexity_heldout"] > 1
    assert utility["loss_members"] < utility["base_loss_members"]  # 3 steps at lr 0.01 already fit the members
    ours = CausalLMTask("embedded-lm", lora=read_spec(adapter), seed=7)  # another seed: A differs until loaded
    ours.load_adapter(adapter)
    moved = _lora(ours.model)
    assert all(torch.any(v != 0) for k, v in moved.items() if "lora_B" in k)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] is True
    assert set(config["target_modules"]) == {"c_attn", "attn.c_proj"}
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_lm_path()), adapter).eval()
    ours.model.eval()
    encoded = ours.encode(data.batch([0, 1, 2, 3]))
    with torch.no_grad():
        want = plain(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
        got = ours.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
        with ours.adapter_disabled():
            base = ours.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-3  # the adapter changes the model: the equality above is not vacuous


def test_dp_training_updates_every_lora_tensor(tmp_path):
    from privlora.tasks.causal_lm import CausalLMTask
    from privlora.tasks.lora import read_spec

    result = _train(tmp_path, "dp", mode="dp", **{"dp.noise_multiplier": 0.5, "dp.max_grad_norm": 1.0,
                                                   "optim.lr": 0.01, "optim.max_steps": 4})
    privacy = json.loads((result.run_dir / "privacy.json").read_text())
    assert privacy["epsilon"] > 0 and privacy["steps"] == 4 and privacy["dataset_size"] == 20  # 0.5 of 40
    task = CausalLMTask("embedded-lm", lora=read_spec(result.run_dir / "adapter"), seed=0)
    before = _lora(task.model)
    task.load_adapter(result.run_dir / "adapter")
    after = _lora(task.model)
    b_tensors = [k for k in after if "lora_B" in k]
    assert len(b_tensors) == 8  # 4 layers × (c_attn, attn.c_proj)
    assert all(torch.any(after[k] != 0) for k in b_tensors), "a LoRA B tensor stayed zero under DP"
    assert all(not torch.equal(before[k], after[k]) for k in after)


def test_smp_trains_against_the_proxy_attacker(tmp_path):
    result = _train(tmp_path, "smp", mode="smp", **{"optim.max_steps": 2})
    assert result.privacy["mechanism"].startswith("empirical")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("attacker_loss" in row and "attacker_loss_members" in row for row in rows)
    with pytest.raises(UserError, match="calibrated view is for diffusion"):
        _train(tmp_path, "smp-calibrated", mode="smp", **{"mp.attacker": "calibrated"})


def test_loss_scores_response_tokens_only(task, data):
    batch = data.batch([0, 1])
    encoded = task.encode(batch)
    with torch.no_grad():
        nll, mask = task.token_nll(encoded)
        loss = nll.sum(1) / mask.sum(1)
        torch.testing.assert_close(loss, task.per_sample_loss(batch))
        prompt = ~encoded["response_mask"] & encoded["attention_mask"].bool()
        scrambled = dict(encoded, labels=torch.where(prompt, torch.randint_like(encoded["labels"], 100),
                                                     encoded["labels"]))
        nll2, _ = task.token_nll(scrambled)
        torch.testing.assert_close(nll2.sum(1) / mask.sum(1), loss, atol=0, rtol=0)
        changed = data.batch([0, 1])
        changed["responses"] = [r.replace("AC-", "ZZ-") for r in changed["responses"]]
        assert not torch.allclose(task.per_sample_loss(changed), loss)
    p_ids, r_ids = task.encode_pair(batch["prompts"][0], batch["responses"][0])
    assert int(mask[0].sum()) == len(r_ids) and r_ids[-1] == task.eos_id  # every response token, EOS included
    assert task.tokenizer.decode(p_ids).endswith("### Assistant:\n")
    features = task.attack_features(batch)
    assert features.shape == (2, 9)
    torch.testing.assert_close(features[:, 0], loss, atol=1e-5, rtol=1e-5)  # column 0: the mean NLL
    assert torch.all(features[:, 2] <= features[:, 5]) and torch.all(features[:, 5] <= features[:, 8])


def test_llama_gets_lora_on_q_k_v_o(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from privlora.tasks.causal_lm import CausalLMTask
    from privlora.tasks.embedded_lm import embedded_lm_path

    config = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tiny LM's tokenizer: same 4,096 ids
        shutil.copy(embedded_lm_path() / name, tmp_path / "llama" / name)
    task = CausalLMTask(tmp_path / "llama")
    wrapped = {n.rsplit(".", 1)[0] for n, _ in task.model.named_modules() if n.endswith(".lora_A")}
    assert {n.rsplit(".", 1)[1] for n in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(wrapped) == 8 and task.max_length == 128
    batch = {"prompts": [(("user", "Hi"),)], "responses": ["Hello there"]}
    task.per_sample_loss(batch).sum().backward()
    grads = {n: p.grad for n, p in task.model.named_parameters() if p.requires_grad}
    assert len(grads) == 16 and all(torch.any(g != 0) for n, g in grads.items() if "lora_B" in n)


def test_demo_support_is_deterministic_and_distinct():
    from privlora.data.support import support_records

    a, b = support_records(200, seed=0), support_records(200, seed=0)
    assert a == b
    assert support_records(50, seed=0) == a[:50]  # prefix-stable
    assert support_records(50, seed=1) != a[:50]
    for field in ("name", "email", "account"):
        values = [r["pii"][field] for r in a]
        assert len(set(values)) == len(values), field
    assert len({r["response"] for r in a}) == len(a)
    assert all(r["pii"]["account"] in r["response"] and r["pii"]["name"] in r["prompt"] for r in a)


def test_demo_support_splits_through_the_usual_members_aux_eval():
    from privlora.data.instructions import load_instruction_dataset
    from privlora.data.splits import make_splits

    data = load_instruction_dataset("demo:support", limit=100)
    splits = make_splits(data, members=0.5, aux=0.2, eval=0.3, seed=0, source="demo:support")
    assert (len(splits.members), len(splits.aux), len(splits.eval)) == (50, 20, 30)
    assert not set(splits.members) & set(splits.eval)
    assert data.by_ids(splits.members).responses[0] == data.responses[data.ids.index(splits.members[0])]


def test_tampered_weights_are_refused(tmp_path):
    from privlora.tasks.causal_lm import CausalLMTask
    from privlora.tasks.embedded_lm import embedded_lm_path, verify_weights

    copy = tmp_path / "lm"
    shutil.copytree(embedded_lm_path(), copy)
    verify_weights(copy)  # an exact copy passes
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # one bit of one weight: safetensors would still load it
    weights.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="does not match its provenance"):
        CausalLMTask(copy)


def test_jsonl_shapes_and_wrong_fields(tmp_path):
    from privlora.data.instructions import load_jsonl

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n\n" + json.dumps(
        {"id": "chat-1", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                      {"role": "assistant", "content": "a"}]}) + "\n")
    data = load_jsonl(good)
    assert data.ids == ["good.jsonl:1", "chat-1"]
    assert data.prompts == [(("user", "p"),), (("system", "s"), ("user", "u"))] and data.responses == ["r", "a"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected 'prompt' and 'response'.*found fields: "
                                        r"'question', 'answer'"):
        load_jsonl(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}))
    with pytest.raises(UserError, match="last message must be the assistant"):
        load_jsonl(bad)


def test_chat_template_is_used_when_the_tokenizer_has_one(task):
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    task.tokenizer.chat_template = template
    task._encoded.clear()
    try:
        assert task.format_prompt((("user", "Hi"),)) == "<|user|>Hi<|end|><|assistant|>"
        prompt, response = task.encode_pair((("user", "Hi"),), "Hello")
        assert task.tokenizer.decode(prompt) == "<|user|>Hi<|end|><|assistant|>"
        assert task.tokenizer.decode(response) == "Hello<|end|>"  # the turn's end is learnt, the prompt is not
    finally:
        task.tokenizer.chat_template = None
        task._encoded.clear()


def test_data_max_tokens_bounds_every_encoded_record():
    from privlora.tasks.lora import LoraSpec
    from privlora.train.data import load_task_and_data

    config = load_config(None, {"task": "causal-lm", "data.limit": 8, "data.max_tokens": 24})
    task, data = load_task_and_data(config, LoraSpec(rank=2, alpha=2, targets=("auto",)))
    encoded = task.encode(data.batch(list(range(len(data)))))
    assert task.max_length == 24 and encoded["input_ids"].shape[1] <= 24
    assert bool(encoded["response_mask"].any(dim=1).all())  # every record keeps response tokens to score
    with pytest.raises(Exception, match="max_tokens"):
        load_config(None, {"task": "causal-lm", "data.max_tokens": 4})
