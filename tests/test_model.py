"""Our model modules against transformers, for full prompts and for paged, chunked batches."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from server.model.attn_metadata import AttentionMetadata
from server.model.kv_cache import allocate_kv_cache
from server.model.loader import load_model
from tests.tiny_models import VOCAB_SIZE

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def model_dirs(tiny_model_factory) -> dict[str, Path]:
    dirs = {a: tiny_model_factory(a, **({"shards": 3} if a == "qwen2" else {})) for a in ARCHS}
    dirs["mistral_sw"] = tiny_model_factory("mistral", sliding_window=8)
    return dirs


def _hf_logits(model_dir: Path, ids: list[int], dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB_SIZE, (n,), generator=torch.Generator().manual_seed(seed)
                         ).tolist()


@dataclass
class _Seq:
    tokens: list[int]
    blocks: list[int]
    computed: int = 0


class _MiniRunner:
    """Just enough of a model runner: block tables, slot mapping, flattened varlen batches."""

    def __init__(self, model_dir: Path, block_size: int, num_blocks: int = 2048,
                 dtype: str = "float32") -> None:
        self.model, self.arch, self.dtype = load_model(model_dir, dtype=dtype,
                                                       show_progress=False)
        self.block_size = block_size
        self.caches = allocate_kv_cache(self.arch, num_blocks, block_size, self.dtype, "cpu")
        # Highest ids first, then shuffled: block ids are large and non-contiguous.
        rest = list(range(num_blocks - 3))
        random.Random(0).shuffle(rest)
        self.free = [num_blocks - 1, num_blocks - 2, num_blocks - 3, *rest]

    def ensure_blocks(self, seq: _Seq, length: int) -> None:
        while len(seq.blocks) * self.block_size < length:
            seq.blocks.append(self.free.pop(0))

    def step(self, work: list[tuple[_Seq, int]]) -> list[torch.Tensor]:
        """Compute `n` more tokens of each seq (decodes listed first); logits per seq."""
        bs = self.block_size
        ids, pos, slots, qsl, lens = [], [], [], [0], []
        for seq, n in work:
            self.ensure_blocks(seq, seq.computed + n)
            for p in range(seq.computed, seq.computed + n):
                ids.append(seq.tokens[p])
                pos.append(p)
                slots.append(seq.blocks[p // bs] * bs + p % bs)
            qsl.append(qsl[-1] + n)
            lens.append(seq.computed + n)
        width = max(len(s.blocks) for s, _ in work)
        tables = torch.zeros(len(work), width, dtype=torch.int32)
        for i, (seq, _) in enumerate(work):
            tables[i, :len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        num_decodes = 0
        while num_decodes < len(work) and work[num_decodes][1] == 1:
            num_decodes += 1
        md = AttentionMetadata(
            num_actual_tokens=len(ids), slot_mapping=torch.tensor(slots),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32), query_start_loc_cpu=qsl,
            seq_lens=torch.tensor(lens, dtype=torch.int32), seq_lens_cpu=lens,
            block_tables=tables, max_query_len=max(n for _, n in work), max_seq_len=max(lens),
            num_decodes=num_decodes, block_size=bs,
        )
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.caches, md)
            logits = self.model.compute_logits(hidden)
        for seq, n in work:
            seq.computed += n
        return [logits[qsl[i]:qsl[i + 1]] for i in range(len(work))]


@pytest.mark.parametrize("arch", ARCHS)
def test_full_prompt_matches_transformers(model_dirs: dict[str, Path], arch: str) -> None:
    ids = _ids(37, seed=1)
    runner = _MiniRunner(model_dirs[arch], block_size=16)
    (ours,) = runner.step([(_Seq(ids, []), len(ids))])
    # fp32 on both sides; differences are summation order only.
    torch.testing.assert_close(ours, _hf_logits(model_dirs[arch], ids), atol=1e-4, rtol=1e-4)


def _schedule(runner: _MiniRunner, seqs: list[_Seq], shared: _Seq | None,
              collected: list[list[torch.Tensor]]) -> None:
    """Chunked prefill, then mixed prefill/decode steps, then pure decode steps."""
    def run(work: list[tuple[int, int]]) -> None:
        outs = runner.step([(seqs[i], n) for i, n in work])
        for (i, _), out in zip(work, outs, strict=True):
            collected[i].append(out)

    a, b, c, d = seqs[:4]
    # Step 1: first chunks of every prompt; seq 3's prompt ends here. Seq 4 reuses seq 0's
    # first full block (a prefix hit) that seq 0 writes in this very step.
    step1 = [(0, 36), (1, 33), (2, 9), (3, 12)]
    run(step1 if shared is None else [*step1, (4, 20)])
    # Step 2: seq 3 decodes while the others prefill the rest of their prompts.
    step2 = [(3, 1), (0, 14), (1, 40), (2, 14)]
    run(step2 if shared is None else [*step2, (4, 3)])
    # Then everybody decodes (the tokens are fixed: teacher forcing, comparable to HF).
    for _ in range(3):
        run([(i, 1) for i in range(len(seqs))])
    assert a.computed == 53 and b.computed == 76 and c.computed == 26 and d.computed == 16


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("arch", [*ARCHS, "mistral_sw"])
def test_paged_chunked_batch_matches_transformers(model_dirs: dict[str, Path], arch: str,
                                                  block_size: int) -> None:
    runner = _MiniRunner(model_dirs[arch], block_size=block_size)
    full = [_ids(53, 10), _ids(76, 11), _ids(26, 12), _ids(16, 13)]
    seqs = [_Seq(t, []) for t in full]
    # Seq 4 starts with seq 0's first block_size tokens and is handed that block as cached.
    shared_tokens = full[0][:block_size] + _ids(26, 14)
    shared = _Seq(shared_tokens, [], computed=block_size)
    seqs.append(shared)
    collected: list[list[torch.Tensor]] = [[] for _ in seqs]
    # Seq 0 gets its blocks first so that the shared block exists before seq 4 is set up.
    runner.ensure_blocks(seqs[0], 53)
    shared.blocks = [seqs[0].blocks[0]]
    _schedule(runner, seqs, shared, collected)
    for i, seq in enumerate(seqs):
        ours = torch.cat(collected[i])
        start = block_size if seq is shared else 0
        want = _hf_logits(model_dirs[arch], seq.tokens[:seq.computed])[start:]
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_sliding_window_is_honored(model_dirs: dict[str, Path]) -> None:
    """The window changes HF's logits past position 8, and ours follow (same as above)."""
    ids = _ids(40, seed=5)
    windowed = _hf_logits(model_dirs["mistral_sw"], ids)
    full = _hf_logits(model_dirs["mistral"], ids)
    # Same weights (same seed), so only the window differs: equal up to the window, not after.
    torch.testing.assert_close(windowed[:8], full[:8], atol=1e-5, rtol=1e-5)
    assert (windowed[8:] - full[8:]).abs().max() > 1e-2
    runner = _MiniRunner(model_dirs["mistral_sw"], block_size=16)
    assert runner.arch.sliding_window == 8
    (ours,) = runner.step([(_Seq(ids, []), len(ids))])
    torch.testing.assert_close(ours, windowed, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_bf16_close_to_fp32(model_dirs: dict[str, Path], arch: str) -> None:
    """bf16 logits stay about as close to fp32 as transformers' own bf16 does."""
    ids = _ids(48, seed=7)
    runner = _MiniRunner(model_dirs[arch], block_size=16, dtype="bfloat16")
    assert runner.dtype == torch.bfloat16
    assert runner.model.model.layers[0].mlp.down_proj.packed_weight is not None
    prompt = _Seq(ids, [])
    ours = torch.cat([runner.step([(prompt, 40)])[0]]
                     + [runner.step([(prompt, 1)])[0] for _ in range(8)])
    ref32 = _hf_logits(model_dirs[arch], ids)
    ref16 = _hf_logits(model_dirs[arch], ids, torch.bfloat16)
    our_err = (ours - ref32).abs().max().item()
    hf_err = (ref16 - ref32).abs().max().item()
    scale = ref32.abs().max().item()
    # bf16 keeps 8 mantissa bits (~0.4% relative); two layers add a few roundings more.
    assert our_err < 0.03 * scale
    assert our_err < 2.0 * hf_err + 1e-3
    agree = (ours.argmax(-1) == ref32.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_padding_rows_are_ignored(model_dirs: dict[str, Path]) -> None:
    """Rows past num_actual_tokens (CUDA-graph style padding) neither write nor change others."""
    runner = _MiniRunner(model_dirs["llama"], block_size=16)
    ids = _ids(10, seed=9)
    seq = _Seq(ids, [])
    runner.ensure_blocks(seq, 10)
    slots = torch.tensor([seq.blocks[0] * 16 + p for p in range(10)] + [0, 0])
    md = AttentionMetadata(
        num_actual_tokens=10, slot_mapping=slots,
        query_start_loc=torch.tensor([0, 10], dtype=torch.int32), query_start_loc_cpu=[0, 10],
        seq_lens=torch.tensor([10], dtype=torch.int32), seq_lens_cpu=[10],
        block_tables=torch.tensor([seq.blocks], dtype=torch.int32), max_query_len=10,
        max_seq_len=10, num_decodes=0, block_size=16,
    )
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(ids + [3, 3]), torch.tensor([*range(10), 0, 0]),
                              runner.caches, md)
        logits = runner.model.compute_logits(hidden[:10])
    assert hidden.shape == (12, 128)
    assert not math.isnan(hidden.sum().item())
    assert bool((runner.caches[0][:, 0] == 0).all())  # slot 0 of block 0 left untouched
    torch.testing.assert_close(logits, _hf_logits(model_dirs["llama"], ids),
                               atol=1e-4, rtol=1e-4)


def test_unknown_attention_backend(model_dirs: dict[str, Path]) -> None:
    from server.model.layers.attention_backend import (
        get_attention_backend,
        supported_attention_backends,
    )

    assert "torch" in supported_attention_backends()
    assert get_attention_backend("torch").name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; available: torch"):
        load_model(model_dirs["llama"], attention_backend="flash", show_progress=False)
