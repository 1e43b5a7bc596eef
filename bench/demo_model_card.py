"""The demo model's card (README.md) and provenance helpers, written from metrics.json.

Kept apart from the training pipeline so the card can be regenerated without training.
"""

from __future__ import annotations

from pathlib import Path

# Evaluation window of the held-out perplexity, quoted in the card.
EVAL_WINDOW = 256


def write_card(out: Path, m: dict, samples: list[tuple[str, str]]) -> None:
    n_ids = m["eval_tokens"] + m["eval_windows"]  # each window's first id is not scored
    dtype = m["train_dtype_flag"]
    sample_md = "\n".join(f"- **`{p}`** → `{c.strip()[:200]!r}`" for p, c in samples)
    card = f"""---
license: psf-2.0
language: en
library_name: transformers
pipeline_tag: text-generation
---

# Conveyor demo model

A tiny Llama-architecture language model trained from scratch on the Python 3.11
documentation. It exists so Conveyor has a real (non-random) model to serve, test and
benchmark without downloading anything. It writes documentation-flavoured English and
reStructuredText; do not expect it to answer questions.

## Corpus and license

- Source: the reStructuredText sources (`*.rst.txt`) of the Python 3.11 documentation as
  shipped by Debian's `python3.11-doc` package (`/usr/share/doc/python3.11/html/_sources`),
  Debian version `{m["corpus_package_version"]}`.
- The documentation is © Python Software Foundation and distributed under the PSF License
  Agreement (see `copyright.rst.txt` / `license.rst.txt` in that package). These weights
  and `heldout.txt` (an excerpt of the documentation) are derived from it and are provided
  under the same terms.
- {m["num_documents"]} files in sorted path order; every {m["val_every"]}th file
  ({m["num_val_documents"]} files) is held out and never trained on. Train stream:
  {m["train_tokens"]:,} tokens.

## Architecture

`LlamaForCausalLM`: {m["layers"]} layers, hidden {m["hidden"]}, intermediate
{m["intermediate"]}, {m["heads"]} query heads / {m["kv_heads"]} KV heads (GQA), head_dim
{m["head_dim"]}, RoPE theta 10000, max positions 512, tied embeddings,
**{m["params"]:,} parameters**. Byte-level BPE tokenizer, vocabulary {m["vocab_size"]},
special tokens `<unk> <s> </s> <pad> <|system|> <|user|> <|assistant|>`; `<s>` is prepended
by the tokenizer. A simple chat template (`<|role|>\\ncontent</s>\\n` per turn, generation
prompt `<|assistant|>\\n`) is included for API plumbing; the model was not trained on chat.
Weights are stored in bfloat16 (`model.safetensors`).

## Training

AdamW (β=0.9/0.95, weight decay {m["weight_decay"]}), peak LR {m["lr"]}, {m["warmup"]} warm-up
steps then cosine decay to {m["min_lr_ratio"]}× peak, gradient clip {m["clip"]}, batch
{m["batch"]} × {m["seq_len"]} packed tokens, {m["train_dtype"]} on {m["threads"]} CPU threads
(chosen by a {m["trial_steps"]}-step timing trial: fp32 {m["trial_s_per_step"]["fp32"]:.2f} s/step,
bf16 autocast {m["trial_s_per_step"]["bf16"]:.2f} s/step), seed {m["seed"]}.

| | |
|---|---|
| steps | {m["steps"]:,} |
| tokens seen | {m["tokens_seen"]:,} ({m["epochs"]:.2f} epochs) |
| training time | {m["train_minutes"]:.1f} min |
| final train loss (last 20 steps) | {m["final_train_loss"]:.4f} |
| **held-out loss** | **{m["val_loss"]:.4f}** nats/token |
| **held-out perplexity** | **{m["perplexity"]:.2f}** |

The same figures are in `metrics.json` (machine-readable; `tests/test_demo_model.py`
checks the perplexity against it).

### Evaluation procedure

`heldout.txt` ({m["heldout_bytes"]:,} bytes) is the start of the held-out files. Load this
directory with `AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)` (the bf16
weights as shipped, upcast) and `AutoTokenizer.from_pretrained(path)`; tokenize the whole
file with `tokenizer(text)` (adds the leading `<s>`), giving {n_ids:,} ids;
cut them into consecutive non-overlapping windows of {EVAL_WINDOW} ids (the last one
shorter), run each window on its own, and take the mean cross-entropy of every id after the
first in each window ({m["eval_tokens"]:,} scored ids over {m["eval_windows"]} windows).
Perplexity = exp(mean NLL). Code: `heldout_nll` in `bench/train_demo_model.py`.

## Greedy samples

{sample_md}

## Reproduce

```
apt-get install -y python3.11-doc
python -m bench.train_demo_model --max-steps {m["steps"]} \\
    --schedule-steps {m["schedule_steps"]} --minutes 1000 --dtype {dtype}
```

The run used `--minutes {m["budget_minutes"]:g}`, which fixes the step count from a timing
trial, so other hardware would pick a different count; pinning `--max-steps`,
`--schedule-steps` and `--dtype` replays the same data order and schedule (bit-exactness
still depends on the CPU's kernels).
"""
    (out / "README.md").write_text(card, encoding="utf-8")


def package_version(name: str) -> str:
    status = Path("/var/lib/dpkg/status")
    if not status.exists():
        return "unknown"
    for block in status.read_text(errors="replace").split("\n\n"):
        if f"Package: {name}\n" in block + "\n":
            for line in block.splitlines():
                if line.startswith("Version: "):
                    return line.split(": ", 1)[1]
    return "unknown"


# ----------------------------------------------------------------------------- main
