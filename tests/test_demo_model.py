"""The shipped demo model (server/demo_model): loads offline, matches its card, and
Conveyor's greedy decoding reproduces transformers' token for token.

The model is trained by bench/train_demo_model.py; these tests need only the shipped files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server import LLM, SamplingParams

# CONVEYOR_DEMO_MODEL points the tests at a freshly trained copy before it is shipped.
DEMO = Path(os.environ.get("CONVEYOR_DEMO_MODEL")
            or Path(__file__).resolve().parent.parent / "server" / "demo_model")
MAX_NEW = 24
PROMPTS = [
    "The list type",
    "To open a file for reading,",
    "A dictionary is",
    "The :mod:`os` module provides",
    "Exceptions are raised when",
    "def fibonacci(n):",
    "In Python 3.11,",
    ".. function:: len(s)\n\n   Return the",
]

pytestmark = pytest.mark.skipif(not (DEMO / "model.safetensors").exists(),
                                reason="demo model not built (python -m bench.train_demo_model)")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Weights ship in bf16; both sides of every comparison run them upcast to fp32.
    model = AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32,
                                                 local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(DEMO), local_files_only=True)
    return model, tok


def test_shipped_files_and_size():
    for name in ["config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "README.md", "metrics.json",
                 "heldout.txt"]:
        assert (DEMO / name).is_file(), name
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size < 40 * 2**20
    gen = json.loads((DEMO / "generation_config.json").read_text())
    cfg = json.loads((DEMO / "config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] and gen["bos_token_id"] == cfg["bos_token_id"]


@torch.no_grad()
def test_heldout_perplexity_matches_card(hf):
    """Recompute the card's figure by the procedure it documents, independently of the
    training script: tokenize with <s>, non-overlapping 256-id windows, mean token NLL."""
    model, tok = hf
    metrics = json.loads((DEMO / "metrics.json").read_text())
    window = metrics["eval_window"]
    ids = tok((DEMO / "heldout.txt").read_text(encoding="utf-8"))["input_ids"]
    assert ids[0] == tok.bos_token_id
    starts = [s for s in range(0, len(ids), window) if len(ids) - s >= 2]
    full = [s for s in starts if len(ids) - s >= window]
    total, count = 0.0, 0
    if full:  # all full windows in one batch, then the short tail on its own
        x = torch.tensor([ids[s: s + window] for s in full])
        logits = model(input_ids=x).logits
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                 x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    for s in starts[len(full):]:
        x = torch.tensor([ids[s: s + window]])
        logits = model(input_ids=x).logits
        total += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += x.shape[1] - 1
    assert count == metrics["eval_tokens"]
    ppl = math.exp(total / count)
    assert ppl == pytest.approx(metrics["perplexity"], rel=0.02)
    # The human-readable card quotes the same figure.
    assert f"{metrics['perplexity']:.2f}" in (DEMO / "README.md").read_text(encoding="utf-8")


def test_conveyor_greedy_matches_transformers(hf):
    model, tok = hf
    llm = LLM(str(DEMO), dtype="float32", num_kv_blocks=256)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW),
                        use_tqdm=False)
    eos = tok.eos_token_id
    with torch.no_grad():
        for prompt, out in zip(PROMPTS, outs):
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            assert out.prompt_token_ids == ids[0].tolist()
            # Stops at the generation config's EOS and keeps it, like Conveyor does.
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
            ref = gen[0, ids.shape[1]:].tolist()
            assert out.outputs[0].token_ids == ref, prompt
            assert out.outputs[0].finish_reason == ("stop" if ref[-1] == eos else "length")


def test_chat_template(hf):
    _, tok = hf
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(tok.bos_token_id) == 1
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids
