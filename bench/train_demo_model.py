"""Train Conveyor's built-in demo model: a ~7M-parameter Llama on the Python 3.11 docs.

The corpus is the reStructuredText sources of the Python 3.11 documentation as shipped
by Debian's ``python3.11-doc`` package (PSF license, redistributable), so the result can
be shipped as package data in ``server/demo_model/``. Everything is seeded; the step
count is fixed up front from a timing trial so that ``--max-steps N --minutes 1e9``
replays a run exactly (same data order, same schedule).

    apt-get install -y python3.11-doc
    python -m bench.train_demo_model --minutes 25
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.demo_model_card import EVAL_WINDOW, package_version, write_card

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
DEFAULT_OUT = REPO / "server" / "demo_model"

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]  # ids 0..6 in this order

# Each turn is "<|role|>\n{content}</s>\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SAMPLE_PROMPTS = [
    "The list type",
    "To open a file for reading,",
    "A dictionary is",
    "The :mod:`os` module provides",
    "Exceptions are raised when",
    "def fibonacci(n):",
]


# ----------------------------------------------------------------------------- data


def collect_documents(corpus: Path) -> list[tuple[str, str]]:
    """(relative path, text) for every *.rst.txt, in sorted order so runs are reproducible."""
    files = sorted(corpus.rglob("*.rst.txt"), key=lambda p: p.relative_to(corpus).as_posix())
    if not files:
        raise SystemExit(f"no *.rst.txt under {corpus}; run `apt-get install -y python3.11-doc`")
    return [(p.relative_to(corpus).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
            for p in files]


def split_documents(docs: list[tuple[str, str]], every: int
                    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Every `every`-th document is held out, whole, so validation text is never trained on."""
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    val = [d for i, d in enumerate(docs) if i % every == every - 1]
    return train, val


def heldout_text(val_docs: list[tuple[str, str]], max_bytes: int) -> str:
    """The first `max_bytes` of the held-out docs, cut at a line end so the file stays tidy."""
    text = "\n".join(t for _, t in val_docs)
    if len(text.encode("utf-8")) <= max_bytes:
        return text
    cut = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return cut[: cut.rfind("\n") + 1]


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE wrapped as a PreTrainedTokenizerFast that prepends <s> like training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Byte-level: any UTF-8 input round-trips, so <unk> is never actually produced.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Training documents start with <s>, so plain prompts should too.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE,
        model_max_length=512, clean_up_tokenization_spaces=False)


def pack_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """<s> doc </s> <s> doc </s> ... as one flat int64 tensor."""
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for ids in enc:
        out.append(tokenizer.bos_token_id)
        out.extend(ids)
        out.append(tokenizer.eos_token_id)
    return torch.tensor(out, dtype=torch.long)


# ---------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02, hidden_act="silu", attention_bias=False, mlp_bias=False)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay matrices only; norms (1-D) are left alone as is customary.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class Batches:
    """Seeded, epoch-shuffled packed windows of `seq_len` tokens from the train stream."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch: int, seed: int) -> None:
        n = stream.numel() // seq_len
        self.windows = stream[: n * seq_len].view(n, seq_len)
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.gen)
        self.pos = 0
        self.epoch = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > len(self.order):
            self.order = torch.randperm(len(self.windows), generator=self.gen)
            self.pos = 0
            self.epoch += 1
        idx = self.order[self.pos: self.pos + self.batch]
        self.pos += self.batch
        return self.windows[idx]


def train_step(model, opt, batch: torch.Tensor, bf16: bool, clip: float) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def time_trial(model, args: argparse.Namespace, batches: Batches, bf16: bool) -> float:
    """Seconds per step over `--trial-steps` steps on a throwaway copy (first 2 are warm-up)."""
    m = copy.deepcopy(model).train()
    opt = make_optimizer(m, args.lr, args.weight_decay)
    times = []
    for _ in range(args.trial_steps):
        t0 = time.perf_counter()
        train_step(m, opt, batches.next(), bf16, args.clip)
        times.append(time.perf_counter() - t0)
    warm = times[2:] or times
    return sum(warm) / len(warm)


# ------------------------------------------------------------------------- evaluate


@torch.no_grad()
def heldout_nll(model, tokenizer, text: str, window: int = EVAL_WINDOW) -> tuple[float, int]:
    """Mean next-token NLL (nats) on `text` and the number of scored tokens.

    Procedure (the model card and tests/test_demo_model.py rely on it): tokenize with the
    shipped tokenizer including its leading <s>, cut the ids into consecutive
    non-overlapping windows of `window` tokens (the last may be shorter), run each window
    independently, and average the NLL of every token after the first one of each window.
    """
    ids = tokenizer(text)["input_ids"]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start: start + window]
        if len(chunk) < 2:
            continue
        x = torch.tensor([chunk])
        logits = model(input_ids=x).logits.float()
        nll = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total += nll.item()
        count += len(chunk) - 1
    return total / count, count


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[str], max_new: int) -> list[str]:
    outs = []
    for p in prompts:
        x = tokenizer(p, return_tensors="pt")
        gen = model.generate(**x, do_sample=False, max_new_tokens=max_new,
                             pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(gen[0, x["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs


# -------------------------------------------------------------------------- outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                   help="directory holding the Python docs' *.rst.txt sources")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and trial")
    p.add_argument("--val-every", type=int, default=50, help="hold out every Nth document")
    p.add_argument("--heldout-bytes", type=int, default=40_000,
                   help="size cap of heldout.txt (the evaluation text)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--intermediate", type=int, default=688, help="MLP intermediate size")
    p.add_argument("--layers", type=int, default=8, help="decoder layers")
    p.add_argument("--heads", type=int, default=8, help="attention (query) heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--seq-len", type=int, default=256, help="packed training sequence length")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of peak")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps (max 10%% of run)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--minutes", type=float, default=25.0,
                   help="wall-clock training budget; sets the step count from the trial")
    p.add_argument("--max-steps", type=int, default=None,
                   help="step cap (whichever of this and --minutes is smaller wins)")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="cosine schedule length (default: the planned step count)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training precision; auto picks the faster in a timing trial")
    p.add_argument("--trial-steps", type=int, default=20, help="steps per dtype in the trial")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--sample-tokens", type=int, default=40, help="new tokens per greedy sample")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped to a log
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    docs = collect_documents(args.corpus)
    train_docs, val_docs = split_documents(docs, args.val_every)
    heldout = heldout_text(val_docs, args.heldout_bytes)
    print(f"{len(docs)} docs: {len(train_docs)} train, {len(val_docs)} held out; "
          f"heldout.txt {len(heldout.encode()):,} bytes")

    t0 = time.perf_counter()
    tokenizer = train_tokenizer([t for _, t in train_docs], args.vocab_size)
    stream = pack_stream(tokenizer, [t for _, t in train_docs])
    print(f"tokenizer {len(tokenizer)} ids in {time.perf_counter() - t0:.1f}s; "
          f"train stream {stream.numel():,} tokens")

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    # Trial batches come from their own generator so the real run's order is unaffected.
    trial = {"fp32": float("nan"), "bf16": float("nan")}
    if args.dtype == "auto" or args.trial_steps > 0:
        for name in ("fp32", "bf16"):
            tb = Batches(stream, args.seq_len, args.batch, args.seed + 1)
            trial[name] = time_trial(model, args, tb, bf16=(name == "bf16"))
            print(f"trial {name}: {trial[name]:.3f} s/step")
    dtype = args.dtype if args.dtype != "auto" else min(trial, key=trial.get)
    bf16 = dtype == "bf16"
    budget_s = args.minutes * 60
    total = int(budget_s / trial[dtype] * 0.97) if not math.isnan(trial[dtype]) else 10**9
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    # The cosine length is fixed up front; if the wall clock runs out first the run just
    # stops early, and --schedule-steps lets such a run be replayed exactly.
    sched = args.schedule_steps or total
    warmup = min(args.warmup, max(1, sched // 10))
    print(f"training in {dtype}: {total} steps planned, schedule {sched} (warm-up {warmup})")

    batches = Batches(stream, args.seq_len, args.batch, args.seed)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
    while step < total:
        if time.perf_counter() - start > budget_s:  # the trial's estimate was optimistic
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sched, args.lr, warmup, args.min_lr_ratio)
        losses.append(train_step(model, opt, batches.next(), bf16, args.clip))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    bar.close()
    train_s = time.perf_counter() - start
    tokens_seen = step * args.batch * args.seq_len
    print(f"{step} steps, {tokens_seen:,} tokens in {train_s / 60:.1f} min")

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.eval().to(torch.bfloat16)
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 records its own backend class name; the generic fast class loads on
    # both 4.x (which pyproject still allows) and 5.x.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "heldout.txt").write_text(heldout, encoding="utf-8")

    # Evaluate exactly what ships: reload bf16 files, upcast to fp32.
    shipped = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    shipped_tok = AutoTokenizer.from_pretrained(out)
    val_loss, eval_tokens = heldout_nll(shipped, shipped_tok, heldout)
    ids_len = len(shipped_tok(heldout)["input_ids"])
    eval_windows = sum(1 for s in range(0, ids_len, EVAL_WINDOW) if ids_len - s >= 2)
    ppl = math.exp(val_loss)
    print(f"held-out loss {val_loss:.4f}, perplexity {ppl:.2f} ({eval_tokens} tokens)")
    samples = greedy_samples(shipped, shipped_tok, SAMPLE_PROMPTS, args.sample_tokens)
    for p, c in zip(SAMPLE_PROMPTS, samples):
        print(f"  {p!r} -> {c!r}")

    metrics = {
        "val_loss": val_loss, "perplexity": ppl, "eval_tokens": eval_tokens,
        "eval_windows": eval_windows, "eval_window": EVAL_WINDOW,
        "heldout_bytes": len(heldout.encode("utf-8")),
        "steps": step, "schedule_steps": sched, "tokens_seen": tokens_seen,
        "train_minutes": train_s / 60,
        "budget_minutes": args.minutes, "epochs": tokens_seen / stream.numel(),
        "final_train_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "params": n_params, "vocab_size": len(tokenizer), "layers": args.layers,
        "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
        "kv_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
        "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr, "warmup": warmup,
        "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay,
        "clip": args.clip, "seed": args.seed, "threads": args.threads,
        "train_dtype": "bf16 autocast" if bf16 else "fp32", "train_dtype_flag": dtype,
        "trial_steps": args.trial_steps, "trial_s_per_step": trial,
        "num_documents": len(docs), "num_val_documents": len(val_docs),
        "val_every": args.val_every, "train_tokens": stream.numel(),
        "corpus_package": "python3.11-doc",
        "corpus_package_version": package_version("python3.11-doc"),
        "samples": dict(zip(SAMPLE_PROMPTS, samples)),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_card(out, metrics, list(zip(SAMPLE_PROMPTS, samples)))
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; package data should be world-readable
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
