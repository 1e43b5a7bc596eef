"""Weight-only quantized serving: config resolution, quantized linear layers against the
dequantized reference, and an AWQ checkpoint built here loading to the same weights."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import quant
from server import LLM, SamplingParams
from server.model.layers.linear import Linear
from server.model.loader import load_model
from server.model.quantization import QuantConfig, resolve_quant_config
from tests.tiny_models import VOCAB_SIZE

AWQ_CFG = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
           "version": "gemm", "modules_to_not_convert": None}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_resolve_quant_config():
    assert resolve_quant_config(None, {}) is None
    assert resolve_quant_config("int8", {}) == QuantConfig("int8")
    assert resolve_quant_config("int4", {}).group_size == 128
    awq = resolve_quant_config(None, {"quantization_config": AWQ_CFG})
    assert awq == QuantConfig("int4", group_size=64, from_awq=True)
    assert resolve_quant_config("awq", {"quantization_config": AWQ_CFG}) == awq
    assert resolve_quant_config("int4", {"quantization_config": AWQ_CFG}) == awq
    with pytest.raises(ValueError, match="already AWQ int4"):
        resolve_quant_config("int8", {"quantization_config": AWQ_CFG})
    with pytest.raises(ValueError, match="needs an AWQ checkpoint"):
        resolve_quant_config("awq", {})
    with pytest.raises(ValueError, match="'gptq' is not supported"):
        resolve_quant_config(None, {"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError, match="3-bit"):
        resolve_quant_config(None, {"quantization_config": {**AWQ_CFG, "bits": 3}})
    with pytest.raises(ValueError, match="unknown quantization 'fp8'"):
        resolve_quant_config("fp8", {})


@pytest.mark.parametrize("method,k", [("int8", 96), ("int4", 128), ("int4", 200)])
def test_quantized_linear_matches_dequantized_weight(method, k):
    """A packed (two-shard) Linear quantized after loading computes x @ dequant(W).T."""
    torch.manual_seed(0)
    sizes = [64, 32]
    lin = Linear(k, sizes, bias=True, shard_names=("a", "b"), dtype=torch.float32,
                 quant=QuantConfig(method, group_size=64))
    shards = [torch.randn(n, k) for n in sizes]
    for i, w in enumerate(shards):
        lin.load_weight("weight", w, shard=i)
    lin.load_weight("bias", torch.randn(96))
    dense = torch.cat(shards)
    lin.process_weights_after_loading()
    assert lin.weight is None and lin.qweight is not None
    if method == "int8":
        assert lin.qweight.dtype == torch.int8 and lin.qzeros is None
        deq = quant.dequantize_int8(lin.qweight, lin.scales, torch.float32)
    else:
        assert lin.qweight.dtype == torch.int32 and lin.qweight.shape == (k, 12)
        deq = quant.dequantize_int4(lin.qweight, lin.scales, lin.qzeros, 64, torch.float32)
    # Round to nearest: per element within half a quantization step of the dense weight.
    step = (dense.abs().amax(1, keepdim=True) / 127 if method == "int8"
            else (dense.max() - dense.min()) / 15)
    assert ((deq - dense).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(2, 3, k)
    torch.testing.assert_close(lin(x), x @ deq.T + lin.bias, atol=1e-4, rtol=1e-4)


def _write_awq_checkpoint(dense_dir: Path, out: Path, group: int) -> dict[str, torch.Tensor]:
    """Quantize a dense checkpoint's decoder linears into AWQ's GEMM tensors (interleaved
    nibbles, fp16 scales); returns the natural-layout tensors the loader should end with."""
    shutil.copytree(dense_dir, out)
    (out / "model.safetensors").unlink()
    dense = load_file(str(dense_dir / "model.safetensors"))
    tensors, expect = {}, {}
    for name, w in dense.items():
        proj = name.split(".")[-2] if name.endswith(".weight") else ""
        if proj not in DECODER_LINEARS:
            tensors[name] = w
            continue
        qw, s, qz = quant.quantize_int4(w.float(), group)
        base = name.removesuffix(".weight")
        tensors[f"{base}.qweight"] = quant.natural_to_awq(qw).contiguous()
        tensors[f"{base}.qzeros"] = quant.natural_to_awq(qz).contiguous()
        tensors[f"{base}.scales"] = s.half().contiguous()
        expect[base] = (qw, s.half().float(), qz)
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {**AWQ_CFG, "group_size": group}
    (out / "config.json").write_text(json.dumps(cfg))
    return expect


def _dequantized_dense_checkpoint(dense_dir: Path, out: Path, expect: dict, group: int) -> None:
    """The same model with every AWQ linear replaced by its exact dequantized weight."""
    shutil.copytree(dense_dir, out)
    tensors = load_file(str(dense_dir / "model.safetensors"))
    for base, (qw, s, qz) in expect.items():
        tensors[f"{base}.weight"] = quant.dequantize_int4(qw, s, qz, group, torch.float32)
    save_file(tensors, str(out / "model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_awq_checkpoint_loads_exactly(arch, tiny_model_factory, tmp_path):
    dense_dir = tiny_model_factory(arch)
    expect = _write_awq_checkpoint(dense_dir, tmp_path / "awq", group=64)
    model, _, _ = load_model(tmp_path / "awq", dtype="float32", show_progress=False)
    assert model.quant == QuantConfig("int4", group_size=64, from_awq=True)
    qkv = model.model.layers[1].self_attn.qkv_proj
    q, k, v = (expect[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    # Packed shards land side by side along the output dim, in our natural nibble order.
    assert torch.equal(qkv.qweight, torch.cat([q[0], k[0], v[0]], dim=1))
    assert torch.equal(qkv.scales, torch.cat([q[1], k[1], v[1]], dim=1))
    assert torch.equal(qkv.qzeros, torch.cat([q[2], k[2], v[2]], dim=1))
    assert model.lm_head.quant is None

    # Greedy output equals a dense model holding the exact dequantized weights.
    _dequantized_dense_checkpoint(dense_dir, tmp_path / "deq", expect, group=64)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (4, 19, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(path: Path, **kw) -> list[list[int]]:
        llm = LLM(str(path), dtype="float32", num_kv_blocks=64, **kw)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    assert run(tmp_path / "awq") == run(tmp_path / "deq")
    with pytest.raises(ValueError, match="already AWQ int4"):
        LLM(str(tmp_path / "awq"), quantization="int8", num_kv_blocks=64)


def test_awq_modules_to_not_convert(tiny_model_factory, tmp_path):
    """Modules the AWQ checkpoint left dense load as dense weights."""
    dense_dir = tiny_model_factory("llama")
    _write_awq_checkpoint(dense_dir, tmp_path / "awq", group=64)
    tensors = load_file(str(tmp_path / "awq" / "model.safetensors"))
    dense = load_file(str(dense_dir / "model.safetensors"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        base = f"model.layers.0.mlp.{proj}"
        for suffix in ("qweight", "qzeros", "scales"):
            del tensors[f"{base}.{suffix}"]
        tensors[f"{base}.weight"] = dense[f"{base}.weight"]
    save_file(tensors, str(tmp_path / "awq" / "model.safetensors"))
    cfg_path = tmp_path / "awq" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = ["layers.0.mlp"]
    cfg_path.write_text(json.dumps(cfg))
    model, _, _ = load_model(tmp_path / "awq", dtype="float32", show_progress=False,
                             pack_weights=False)
    mlp0, mlp1 = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert mlp0.down_proj.quant is None
    assert torch.equal(mlp0.down_proj.weight, dense["model.layers.0.mlp.down_proj.weight"])
    assert mlp1.down_proj.qweight is not None


def test_quantization_shrinks_resident_weights(tiny_model_factory):
    model_dir = tiny_model_factory("llama", hidden_size=256, intermediate_size=512)
    sizes = {}
    for q in (None, "int8", "int4"):
        llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=32, quantization=q)
        sizes[q] = llm.engine.info.weight_bytes
        assert llm.engine.info.quantization == {None: "none", "int8": "int8 (per-channel)",
                                                 "int4": "int4 g128"}[q]
    # Only the decoder linears shrink: embeddings and lm_head stay fp32.
    assert sizes["int4"] < sizes["int8"] < sizes[None] * 0.6
