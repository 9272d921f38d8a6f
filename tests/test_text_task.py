"""The text Task (MiniLM + LoRA + head) and text datasets: offline loading, per-sample losses that a
micro-batch loop agrees with, adapters that peft loads directly, and weights that training moves."""

from __future__ import annotations

import json

import pytest
import torch

from privlora.data.text import load_text_dataset, load_text_file, load_tweets
from privlora.errors import UserError
from privlora.tasks.text import TextClassificationTask, minilm_path


@pytest.fixture(scope="module")
def tweets():
    return load_tweets(limit=400)


@pytest.fixture(scope="module")
def task():
    return TextClassificationTask(num_labels=3, seed=0)


def test_tweets_load_offline_with_three_classes(tweets):
    assert tweets.classes == ["negative", "neutral", "positive"]
    assert len(tweets) == 400 and len(set(tweets.ids)) == 400
    assert set(tweets.labels) == {0, 1, 2}
    assert all(isinstance(t, str) and t for t in tweets.texts)


def test_user_csv_and_jsonl(tmp_path):
    csv_file = tmp_path / "fb.csv"
    csv_file.write_text('text,label\n"great service, thanks",pos\nawful queue,neg\n,neg\n')
    data = load_text_file(csv_file)
    assert data.texts == ["great service, thanks", "awful queue"] and data.classes == ["neg", "pos"]
    assert data.labels == [1, 0]
    jsonl = tmp_path / "fb.jsonl"
    jsonl.write_text(json.dumps({"text": "ok", "label": "a"}) + "\n" + json.dumps({"text": "no", "label": "b"}) + "\n")
    assert load_text_dataset(str(jsonl)).labels == [0, 1]


@pytest.mark.parametrize("content,suffix,needle", [
    ("words,label\nx,a\n", ".csv", "'text' and 'label'"),
    ('{"text": "x"}\n', ".jsonl", ":1 is not a JSON object"),
    ("text,label\nx,a\ny,a\n", ".csv", "single label"),
    ("text,label\n", ".xlsx", "expected a .csv"),
])
def test_bad_text_files_are_user_errors(tmp_path, content, suffix, needle):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(UserError, match=needle):
        load_text_file(path)
    with pytest.raises(UserError, match="does not exist"):
        load_text_file(tmp_path / "missing.csv")


def test_only_lora_and_the_head_train(task):
    names = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "classifier" in n for n in names)
    assert any("classifier" in n for n in names)
    frozen = sum(p.numel() for p in task.model.parameters() if not p.requires_grad)
    assert frozen > 20_000_000  # the MiniLM encoder (22.7 M) stays frozen


def test_per_sample_loss_matches_a_one_by_one_loop(task, tweets):
    task.train()  # dropout is zero: train mode must give the same numbers one by one
    batch = {"texts": tweets.texts[:8], "labels": tweets.labels[:8]}  # different lengths → padding
    together = task.per_sample_loss(batch)
    alone = torch.cat([task.per_sample_loss({"texts": [t], "labels": [y]})
                       for t, y in zip(batch["texts"], batch["labels"], strict=True)])
    assert together.shape == (8,)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert task.attack_features(batch).shape == (8, 5)


def test_training_moves_the_adapter_and_fits(tweets):
    task = TextClassificationTask(num_labels=3, seed=1)
    batch = {"texts": tweets.texts[:16], "labels": tweets.labels[:16]}
    before = {n: p.detach().clone() for n, p in task.model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(task.trainable_parameters(), lr=5e-3)
    first = task.per_sample_loss(batch).mean().item()
    for _ in range(25):
        opt.zero_grad()
        loss = task.per_sample_loss(batch).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    moved = [n for n, p in task.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every LoRA tensor and the head changed


def test_adapter_is_a_standard_peft_folder(task, tweets, tmp_path):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    with torch.no_grad():  # make the adapter non-trivial
        for n, p in task.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    task.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    texts = tweets.texts[:4]
    with torch.no_grad():
        expected = task.logits({"texts": texts})
        base = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=3, local_files_only=True)
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        got = peft_model(**task.encode(texts)).logits
        fresh = TextClassificationTask(num_labels=3, seed=7)
        fresh.load_adapter(tmp_path / "adapter")
        again = fresh.logits({"texts": texts})
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError, match="no adapter at"):
        fresh.load_adapter(tmp_path)


def test_hidden_states_depth(task, tweets):
    h0 = task.hidden_states(tweets.texts[:2], 0)
    h6 = task.hidden_states(tweets.texts[:2], 6)
    assert h0.shape[-1] == h6.shape[-1] == 384 and not torch.allclose(h0, h6)
