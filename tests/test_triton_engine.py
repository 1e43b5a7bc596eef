"""The engine end to end on the Triton attention backend (run by Triton's interpreter on the
CPU here, natively on a GPU): the same greedy tokens as the torch reference backend."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from kernels import triton_fused, triton_quant_matmul
from server import LLM, SamplingParams
from server.model.layers.attention_backend import resolve_attention_backend
from tests.tiny_models import VOCAB_SIZE

MAX_TOKENS = 6


def _prompts(seed: int, lens: list[int], prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in lens]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("qwen3", {}),
    # A window shorter than the prompts, crossing block boundaries.
    ("mistral", {"sliding_window": 12}),
])
def test_triton_backend_matches_torch_backend(arch, overrides, tiny_model_factory, kernel_device):
    model_dir = tiny_model_factory(arch, **overrides)
    # A shared 16-token prefix gives prefix-cache hits (cached context + new rows); a small
    # token budget chunks the long prompts, so steps mix decode and prefill rows.
    prompts = _prompts(3, [1, 5, 17, 40], prefix=None) + _prompts(4, [3, 20], prefix=[7] * 16)
    kwargs = dict(dtype="float32", num_kv_blocks=48, max_num_batched_tokens=24,
                  device=kernel_device)
    ref = _greedy(LLM(str(model_dir), attention_backend="torch", **kwargs), prompts)
    llm = LLM(str(model_dir), attention_backend="triton", **kwargs)
    assert llm.engine.attention_backend == "triton"
    assert _greedy(llm, prompts) == ref
    stats = llm.engine.core.scheduler.kv_cache_manager.prefix_cache_stats
    assert stats.hits > 0


def test_triton_backend_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton.*cannot run on cpu"):
        resolve_attention_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_attention_backend("triton", torch.device("cpu")) == "triton"


def test_auto_backend_choice():
    assert resolve_attention_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_attention_backend("auto", torch.device("cpu")) in ("cpu", "torch")
    with pytest.raises(ValueError, match="cannot run on cuda"):
        resolve_attention_backend("cpu", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        resolve_attention_backend("flash", torch.device("cpu"))


@pytest.mark.parametrize("arch,quantization", [("llama", None), ("qwen3", None),
                                               ("llama", "int4")])
def test_every_op_on_triton(arch, quantization, tiny_model_factory, kernel_device, monkeypatch):
    """The CUDA dispatch (Triton norm, rope, activation, KV write, quantized matmuls) taken
    for every op, here on CPU tensors under the interpreter: same tokens as the reference."""
    import kernels

    model_dir = tiny_model_factory(arch)
    prompts = _prompts(5, [2, 9, 30])
    kwargs = dict(dtype="float32", num_kv_blocks=32, device=kernel_device,
                  quantization=quantization)
    monkeypatch.setenv("CONVEYOR_NATIVE_CPU", "0")
    ref = _greedy(LLM(str(model_dir), attention_backend="torch", **kwargs), prompts)
    monkeypatch.setattr(kernels, "_use_triton", lambda x: True)
    calls: Counter[str] = Counter()
    for module, name in ((triton_fused, "rms_norm"), (triton_fused, "rotary_embedding"),
                         (triton_fused, "silu_and_mul"), (triton_quant_matmul, "w4a16_matmul")):
        monkeypatch.setattr(module, name, _counted(getattr(module, name), name, calls))
    assert _greedy(LLM(str(model_dir), attention_backend="triton", **kwargs), prompts) == ref
    assert calls["rms_norm"] and calls["rotary_embedding"] and calls["silu_and_mul"]
    assert bool(calls["w4a16_matmul"]) == (quantization == "int4")


def _counted(fn, name: str, calls: Counter):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper
