"""End to end: Conveyor's greedy output is token-identical to transformers' greedy generate.

All in fp32 on tiny random-weight models, one per supported architecture. Each variant
(preemption, chunked prefill, prefix hits) must also reproduce the reference exactly.
"""

from __future__ import annotations

import random

import pytest
import torch

from server import LLM, SamplingParams
from tests.tiny_models import VOCAB_SIZE

MAX_TOKENS = 10
PROMPT_LENS = [1, 3, 7, 16, 17, 31, 48, 70]


def _prompts(seed: int = 0, lens=PROMPT_LENS, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in lens]


def _reference(model_dir, prompts: list[list[int]], max_new: int = MAX_TOKENS) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new, min_new_tokens=max_new,
                                 eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def _generate(llm: LLM, prompts: list[list[int]], max_new: int = MAX_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    for o in outs:
        assert o.outputs[0].finish_reason == "length"
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_matches_transformers(arch, tiny_model_factory):
    model_dir = tiny_model_factory(arch)
    prompts = _prompts()
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64)
    assert llm.engine.attention_backend == "cpu"  # "auto" picks the native kernel here
    assert _generate(llm, prompts) == _reference(model_dir, prompts)


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_greedy_matches_transformers_torch_backend(arch, tiny_model_factory, monkeypatch):
    """The pure-torch path end to end: reference attention and no native fused ops."""
    monkeypatch.setenv("CONVEYOR_NATIVE_CPU", "0")
    model_dir = tiny_model_factory(arch)
    prompts = _prompts(seed=7)
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, attention_backend="torch")
    assert _generate(llm, prompts) == _reference(model_dir, prompts)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_with_preemption(arch, tiny_model_factory):
    model_dir = tiny_model_factory(arch)
    prompts = _prompts(seed=1, lens=[5, 9, 14, 15, 16, 3, 12, 7])
    # All 8 prompts fit in 10 blocks of 16 tokens at admission; growing by 40 tokens each
    # (about 28 blocks in all) forces running sequences to be preempted and recomputed.
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=10, max_model_len=128)
    got = _generate(llm, prompts, max_new=40)
    assert llm.engine.core.stats().num_preemptions > 0
    assert got == _reference(model_dir, prompts, max_new=40)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_with_chunked_prefill(arch, tiny_model_factory):
    model_dir = tiny_model_factory(arch)
    prompts = _prompts(seed=2)
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, max_num_batched_tokens=8)
    assert _generate(llm, prompts) == _reference(model_dir, prompts)


@pytest.mark.parametrize("arch", ["llama3", "mistral"])
def test_greedy_with_prefix_cache_hits(arch, tiny_model_factory):
    model_dir = tiny_model_factory(arch)
    shared = _prompts(seed=3, lens=[40])[0]
    prompts = _prompts(seed=4, lens=[1, 5, 12, 20], prefix=shared)
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, block_size=16)
    first = _generate(llm, prompts[:1])
    stats = llm.engine.core.stats()
    assert stats.prefix_cache_hits == 0
    rest = _generate(llm, prompts[1:])
    stats = llm.engine.core.stats()
    # Each of the three later prompts reuses the two full blocks of the shared prefix.
    assert stats.prefix_cache_hits == 3 * 32
    assert first + rest == _reference(model_dir, prompts)


def test_prefix_caching_disabled_has_no_hits(tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    prompts = _prompts(seed=5, lens=[20, 20], prefix=_prompts(seed=6, lens=[40])[0])
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    got = _generate(llm, prompts[:1]) + _generate(llm, prompts[1:])
    assert llm.engine.core.stats().prefix_cache_hits == 0
    assert got == _reference(model_dir, prompts)


def test_greedy_string_prompts_and_eos(tiny_model_factory):
    """String prompts go through the tokenizer; generation stops at the model's EOS id."""
    model_dir = tiny_model_factory("llama")
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=64)
    tok = llm.get_tokenizer()
    prompts = ["Hello", "The quick brown fox", "A paged KV cache stores keys"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12),
                        use_tqdm=False)
    ref = _reference(model_dir, [tok(p).input_ids for p in prompts], max_new=12)
    for out, r in zip(outs, ref):
        assert out.prompt_token_ids == tok(out.prompt).input_ids
        expect = r[: r.index(1) + 1] if 1 in r else r
        assert out.outputs[0].token_ids == expect
        assert out.outputs[0].finish_reason == ("stop" if 1 in r else "length")
        assert out.outputs[0].text == tok.decode(
            [t for t in expect if t != 1], skip_special_tokens=True)
