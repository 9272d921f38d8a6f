"""Build the embedded tiny causal LM (``src/privlora/assets/tiny_lm/``) from text that ships with Python.

Why this exists: no PyPI wheel ships a Hugging Face causal language model, and privlora must train and test
offline. So privlora ships its own: a 4-layer GPT-2 (n_embd 128, ~1.3 M parameters, fp32 safetensors, ~5 MB)
with a 4,096-token byte-level BPE, both trained here on ``pydoc_data.topics`` — the Python documentation's
topic pages that every CPython install carries (public text, no personal data).

Deterministic: fixed seed, one CPU thread, fixed order of everything. The same Python docs (their sha256 is
recorded) on the same torch build give the same bytes; the script prints whether the weights' sha256 matches
the shipped provenance. A different Python version has different docs: the script says so and still builds.

    nice -n 10 .venv/bin/python scripts/build_tiny_lm.py            # rebuild into the package assets
    nice -n 10 .venv/bin/python scripts/build_tiny_lm.py --out /tmp/lm --steps 50   # a quick trial
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "privlora" / "assets" / "tiny_lm"
SPECIAL = "<|endoftext|>"
VOCAB = 4096
ARCH = {"n_positions": 256, "n_embd": 128, "n_layer": 4, "n_head": 4}


def corpus() -> str:
    """The Python docs' topic pages, in sorted key order (dict order is not a promise across versions)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def train_tokenizer(text: str):  # -> PreTrainedTokenizerFast
    """Byte-level BPE (GPT-2's scheme): every byte is representable, so any prompt tokenizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   unk_token=SPECIAL, pad_token=SPECIAL, model_max_length=ARCH["n_positions"])


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain(ids: torch.Tensor, eos: int, *, steps: int, batch: int, seq: int, lr: float, seed: int):
    """Next-token prediction on random windows of the token stream; the last 5 % is held out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ARCH)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    cut = int(len(ids) * 0.95)
    train_ids, held_ids = ids[:cut], ids[cut:]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    ema, start = None, time.time()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([train_ids[s:s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} loss {ema:.3f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        windows = [held_ids[s:s + seq] for s in range(0, len(held_ids) - seq, seq)]
        held = float(torch.stack([model(input_ids=w[None], labels=w[None]).loss for w in windows]).mean())
    return model, float(ema), held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread: the float reductions (and so the weights) do not depend on cores
    torch.use_deterministic_algorithms(True)
    old = args.out / "provenance.json"
    previous = json.loads(old.read_text()) if old.is_file() else None

    text = corpus()
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    tokenizer = train_tokenizer(text)
    eos = tokenizer.convert_tokens_to_ids(SPECIAL)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    print(f"corpus: {len(text):,} chars, {len(ids):,} tokens, sha256 {text_sha[:16]}…", flush=True)
    model, final, held = pretrain(ids, eos, steps=args.steps, batch=args.batch_size, seq=args.seq_len,
                                  lr=args.lr, seed=args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))  # config.json, generation_config.json, model.safetensors
    tokenizer.save_pretrained(str(args.out))
    weights = args.out / "model.safetensors"
    for file in args.out.iterdir():
        file.chmod(0o644)  # save_pretrained writes the weights 0600; the package data must be world-readable
    provenance = {
        "model": "GPT-2 architecture (transformers GPT2LMHeadModel), pre-trained by privlora",
        "architecture": {**ARCH, "vocab_size": VOCAB,
                         "parameters": sum(p.numel() for p in model.parameters())},
        "source_text": "pydoc_data.topics (the Python documentation's topic pages, shipped with CPython "
                       f"{platform.python_version()}), keys in sorted order joined by blank lines",
        "source_sha256": text_sha, "source_chars": len(text), "source_tokens": int(len(ids)),
        "tokenizer": f"byte-level BPE, vocab {VOCAB}, trained with the tokenizers library on the source text",
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
        "schedule": "AdamW (weight decay 0.01), 5 % linear warm-up then cosine to 0, grad-norm clip 1",
        "seed": args.seed, "final_loss_ema": final, "heldout_loss": held,
        "heldout": "last 5 % of the token stream, never trained on",
        "torch": torch.__version__, "python": platform.python_version(),
        "weights_file": weights.name, "weights_sha256": sha256_file(weights),
        "command": " ".join(["python scripts/build_tiny_lm.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"final loss {final:.3f}, held-out {held:.3f}; weights sha256 {provenance['weights_sha256']}")
    if previous is not None:
        same = previous.get("weights_sha256") == provenance["weights_sha256"]
        print("weights match the previous build" if same else
              "weights differ from the previous build (other Python docs, torch build or settings?)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
