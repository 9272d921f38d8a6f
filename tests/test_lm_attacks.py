"""Causal-LM membership attacks, secret-sharer exposure and extraction on a tiny GPT-2 fine-tuned here.

The tokenizer (byte-level BPE) is trained offline on Faker sentences, the model is built from a
``GPT2Config`` and fine-tuned with plain torch until it overfits its members, so every attack must
separate members from non-members on it — and must not on the base it started from.
"""

from __future__ import annotations

import copy
import math
import zlib

import numpy as np
import pytest
import torch
from faker import Faker
from sklearn.metrics import roc_auc_score
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from privlora.audit.lm_attacks import min_k_scores, zlib_scores
from privlora.audit.lm_audit import audit_causal_lm
from privlora.audit.lm_canaries import (
    SecretFormat,
    canary_record,
    canary_records,
    exposure,
    exposure_by_insertions,
    make_canaries,
)
from privlora.audit.lm_extraction import (
    edit_distance,
    extraction_prompts,
    extraction_test,
    generate,
    normalised_distance,
    pii_leaks,
)
from privlora.audit.lm_signals import encode_record, pad_batch, pad_id, token_logprobs
from privlora.errors import UserError

EOS = "<|endoftext|>"
PIN = SecretFormat(prefix="my pin is ", length=4)  # 10⁴ secrets: exact rank
ACCOUNT = SecretFormat()  # 10⁹ secrets: extrapolated


def _records(fake: Faker, n: int) -> list[dict[str, str]]:
    return [{"prompt": fake.sentence(nb_words=4) + " ", "response": fake.sentence(nb_words=5)} for _ in range(n)]


@pytest.fixture(scope="module")
def world():
    fake = Faker()
    fake.seed_instance(7)
    corpus = [fake.sentence(nb_words=8) for _ in range(400)] + [f"my pin is {i:04d}" for i in range(0, 10000, 97)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=[EOS],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    records = _records(fake, 96)
    members, non_members, population = records[:32], records[32:64], records[64:]
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    base = GPT2LMHeadModel(config)
    canaries = {"pin": make_canaries(seed=1, fmt=PIN), "account": make_canaries(seed=2, fmt=ACCOUNT)}
    training = members + canary_records(canaries["pin"], PIN) + canary_records(canaries["account"], ACCOUNT)
    target = _fine_tune(base, tokenizer, training, steps=80)
    return {"tokenizer": tokenizer, "base": base, "target": target, "members": members,
            "non_members": non_members, "population": population, "canaries": canaries}


def _fine_tune(base, tokenizer, records, *, steps: int, seed: int = 0):
    """Plain full-batch Adam on the response tokens (the same mask the audit scores)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model.train()
    ids, attention, scored = pad_batch([encode_record(tokenizer, r) for r in records], pad_id(tokenizer))
    labels = ids.masked_fill(~scored, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        opt.step()
    return model.eval()


def test_logprobs_score_response_tokens_only_and_ignore_padding(world):
    tok, model = world["tokenizer"], world["base"]
    records = [{"prompt": "a short prompt ", "response": "an answer."},
               {"prompt": "a much longer prompt with many more words in it ", "response": "yes"},
               {"prompt": "", "response": "no prompt at all"}]
    batched = token_logprobs(model, tok, records, batch_size=3)
    for rec, lp in zip(records, batched, strict=True):
        enc = encode_record(tok, rec)
        assert len(lp) == len(enc.target) == len(tok(rec["response"])["input_ids"]) + 1  # + EOS
        with torch.no_grad():  # one record alone, no padding: read the response positions by hand
            logits = model(input_ids=torch.tensor([enc.ids])).logits[0].double().log_softmax(-1)
        start = len(enc.context)
        manual = [float(logits[t - 1, enc.ids[t]]) for t in range(start, len(enc.ids))]
        np.testing.assert_allclose(lp, manual, atol=1e-4)
    # a caller's own encoder decides what is scored (here: no EOS)
    own = token_logprobs(model, tok, records, encoder=lambda r: encode_record(tok, r, eos=False))
    assert [len(lp) for lp in own] == [len(lp) - 1 for lp in batched]
    np.testing.assert_allclose(own[0], batched[0][:-1], atol=1e-5)
    # the prompt is context only: changing it changes the scores, but never how many tokens are scored
    other = token_logprobs(model, tok, [{"prompt": "zzz qqq ", "response": "an answer."}])[0]
    assert len(other) == len(batched[0]) and not np.allclose(other, batched[0])


def test_attacks_separate_members_and_match_sklearn(world):
    tok, target, base = world["tokenizer"], world["target"], world["base"]
    members, non_members = world["members"], world["non_members"]
    population = members + non_members
    rng = np.random.default_rng(0)
    order = rng.permutation(len(population))
    halves = [sorted(order[:32].tolist()), sorted(order[32:].tolist())]
    inside = np.zeros((2, len(population)), dtype=bool)
    for k, half in enumerate(halves):
        inside[k, half] = True
    references = (_fine_tune(base, tok, [population[i] for i in half], steps=40, seed=10 + k)
                  for k, half in enumerate(halves))  # lazily, one at a time
    audit = audit_causal_lm(target=target, base=base, tokenizer=tok, members=members, non_members=non_members,
                            references=references, reference_inside=inside, population=world["population"])
    assert set(audit.scores) == {"loss", "zlib", "reference", "min_k", "lira", "rmia"}
    for name, s in audit.scores.items():
        got = audit.results["attacks"][name]
        assert got["target"]["auc"] == pytest.approx(roc_auc_score(audit.labels, s["target"]), abs=1e-12)
        assert got["base"]["auc"] == pytest.approx(roc_auc_score(audit.labels, s["base"]), abs=1e-12)
        assert got["target"]["auc"] > 0.9, (name, got["target"]["auc"])
        # the base never saw a record: chance and record difficulty only. With 32 vs 32 records the AUC's
        # chance spread is ±0.07 (1σ), and an untrained base's zlib score is little more than the response's
        # compressed length — a difficulty measure — so "near 0.5" is |AUC − 0.5| < 0.25 (3.5σ)
        assert abs(got["base"]["auc"] - 0.5) < 0.25, (name, got["base"]["auc"])
        assert got["target"]["auc"] > got["base"]["auc"] + 0.2, name
    assert audit.results["attacks"]["reference"]["base"]["auc"] == 0.5  # base − base = 0 for every record
    nll = audit.results["mean_nll"]["target"]
    assert nll["members"] < 0.5 * nll["non_members"]


def test_min_k_and_zlib_follow_their_formulas():
    lp = [np.array([-1.0, -2.0, -3.0, -4.0, -5.0]), np.array([-0.5])]
    np.testing.assert_allclose(min_k_scores(lp, 0.2), [-5.0, -0.5])  # ⌊0.2·5⌋ = 1 token; at least one
    np.testing.assert_allclose(min_k_scores(lp, 0.4), [-4.5, -0.5])
    texts = ["abcabcabcabc", "x"]
    expected = [-3.0 / len(zlib.compress(b"abcabcabcabc")), -0.5 / len(zlib.compress(b"x"))]
    np.testing.assert_allclose(zlib_scores(lp, texts), expected)
    with pytest.raises(UserError):
        min_k_scores(lp, 0.0)


def test_canaries_are_deterministic_and_inserted_as_asked():
    a, b = make_canaries(seed=3), make_canaries(seed=3)
    assert a == b and a != make_canaries(seed=4)
    assert [c.insertions for c in a] == [1, 4, 16, 0]
    assert all(len(c.secret) == 9 and c.secret.isdigit() for c in a)
    assert len({c.secret for c in a}) == len(a)
    recs = canary_records(a)
    assert len(recs) == 21 and recs.count(canary_record(a[2])) == 16
    assert canary_record(a[3]) not in recs  # the control is never inserted


def test_exposure_grows_with_insertions(world):
    tok, target, base = world["tokenizer"], world["target"], world["base"]
    pins = world["canaries"]["pin"]
    exact = exposure(target, tok, pins, fmt=PIN)
    assert all(r["method"] == "exact" and 0 <= r["exposure"] <= math.log2(10_000) for r in exact)
    by = exposure_by_insertions(exact)
    assert by[16] > by[0] + 6, by  # 16 insertions: near the top of 10⁴; never inserted: a random rank
    assert by[16] > math.log2(10_000) - 2
    on_base = exposure_by_insertions(exposure(base, tok, pins, fmt=PIN))
    assert on_base[16] < 8, on_base
    accounts = world["canaries"]["account"]
    far = exposure(target, tok, accounts, candidates=300, seed=0)
    assert all(r["method"] == "extrapolated" and r["exposure_sampled"] <= math.log2(300) for r in far)
    by_far = exposure_by_insertions(far)
    assert by_far[16] > by_far[0] + 6, by_far


def test_greedy_extraction_reproduces_members_more_than_base(world):
    tok, target, base = world["tokenizer"], world["target"], world["base"]
    result = extraction_test(target, tok, world["members"], base=base, samples=2, seed=0)
    target_greedy, base_greedy = result["target"]["greedy"], result["base"]["greedy"]
    assert target_greedy["verbatim_rate"] > 0.5, target_greedy["verbatim_rate"]
    assert base_greedy["verbatim_rate"] == 0.0 and base_greedy["near_verbatim_rate"] < 0.1
    assert target_greedy["near_verbatim_rate"] >= target_greedy["verbatim_rate"]
    assert result["target"]["sampled"]["generations"] == 2 * len(world["members"])
    assert result["target"]["sampled"]["any_near_verbatim_rate"] > result["base"]["sampled"]["any_near_verbatim_rate"]
    non = extraction_test(target, tok, world["non_members"], base=base)
    assert non["target"]["greedy"]["verbatim_rate"] < 0.1  # memorised, not generalised
    # left-padded batches generate what one prompt alone does
    prompts = extraction_prompts(tok, world["members"][:6] + world["non_members"][:2])
    assert generate(target, tok, prompts, batch_size=8) == generate(target, tok, prompts, batch_size=1)
    # with a prefix length, the rest of prompt + response is the target
    cut = extraction_prompts(tok, world["members"][:1], prefix_tokens=3)[0]
    whole = encode_record(tok, world["members"][0], eos=False)
    assert cut.context == whole.ids[:3] and cut.target == whole.ids[3:]


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert normalised_distance("abcd", "abcx") == 0.25 and normalised_distance("", "") == 0.0


def test_base_control_of_a_peft_target_is_the_adapter_disabled(world):
    from peft import LoraConfig, get_peft_model

    tok, base = world["tokenizer"], world["base"]
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    audit = audit_causal_lm(target=peft_model, tokenizer=tok, members=world["members"][:8],
                            non_members=world["non_members"][:8], attacks=["loss"])
    own = token_logprobs(base, tok, world["members"][:8] + world["non_members"][:8])
    np.testing.assert_allclose(audit.scores["loss"]["base"], [lp.mean() for lp in own], atol=1e-5)
    assert not np.allclose(audit.scores["loss"]["target"], audit.scores["loss"]["base"], atol=1e-3)


def test_bad_input_is_a_user_error(world):
    tok, target = world["tokenizer"], world["target"]
    members, non = world["members"][:4], world["non_members"][:4]
    with pytest.raises(UserError, match="prompt"):
        audit_causal_lm(target=target, base=target, tokenizer=tok, members=[{"text": "x"}], non_members=non)
    with pytest.raises(UserError, match="unknown"):
        audit_causal_lm(target=target, base=target, tokenizer=tok, members=members, non_members=non,
                        attacks=["nope"])
    with pytest.raises(UserError, match="reference"):
        audit_causal_lm(target=target, base=target, tokenizer=tok, members=members, non_members=non,
                        attacks=["lira"])
    with pytest.raises(UserError, match="peft"):
        audit_causal_lm(target=target, tokenizer=tok, members=members, non_members=non)


def test_pii_in_generations_counts_what_training_holds():
    """Loads the sanitizer's spaCy analyzer (a few seconds)."""
    training = ["Call Maria Lopez at 212-555-0147 about the invoice."]
    generations = ["You can reach her on 212-555-0147 any day.", "Phone 415-555-0199 for help."]
    found = pii_leaks(generations, ["", ""], training)
    assert found["spans"] >= 2 and found["leaked"] == 1
    assert found["by_type"]["PHONE_NUMBER"]["leaked"] == 1
    # a number the prompt itself contained is copied, not leaked
    assert pii_leaks(generations[:1], ["reach 212-555-0147"], training)["leaked"] == 0


def test_bos_is_prepended_only_for_tokenizers_that_add_it():
    from tokenizers.processors import TemplateProcessing

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    assert encode_record(plain, {"prompt": "hello", "response": "world"}).ids == [3, 4, 1]
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    enc = encode_record(llama_like, {"prompt": "hello", "response": "world"})
    assert enc.context == [0, 3] and enc.target == [4, 1]
