"""Config normalization, checkpoint loading (packing, shards, ties, dtypes) and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.model.hf_config import arch_config_from_dict, read_arch_config, read_eos_token_ids
from server.model.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
from server.model.loader import load_model
from server.model.registry import get_model_class, supported_architectures


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def _checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_sharded_and_single_file_give_identical_weights(tiny_model_factory) -> None:
    single = tiny_model_factory("qwen2", seed=4)
    sharded = tiny_model_factory("qwen2", seed=4, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, _, _ = load_model(single, show_progress=False, pack_weights=False)
    b, _, _ = load_model(sharded, show_progress=False, pack_weights=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_packing_and_ties_follow_the_checkpoint(tiny_model_factory) -> None:
    path = tiny_model_factory("qwen2")
    ckpt = _checkpoint(path)
    assert "lm_head.weight" not in ckpt  # tied: transformers does not save it
    model, arch, _ = load_model(path, show_progress=False, pack_weights=False)
    attn = model.model.layers[1].self_attn
    pre = "model.layers.1.self_attn."
    for p in ("weight", "bias"):
        want = torch.cat([ckpt[f"{pre}{n}_proj.{p}"] for n in "qkv"])
        assert torch.equal(getattr(attn.qkv_proj, p), want)
    assert attn.o_proj.bias is None
    mlp = model.model.layers[1].mlp
    want = torch.cat([ckpt[f"model.layers.1.mlp.{n}_proj.weight"] for n in ("gate", "up")])
    assert torch.equal(mlp.gate_up_proj.weight, want)
    assert arch.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_packed_weights_give_the_same_logits(tiny_model_factory) -> None:
    path = tiny_model_factory("llama")
    dense, _, _ = load_model(path, show_progress=False, pack_weights=False)
    packed, _, _ = load_model(path, show_progress=False)
    assert packed.model.layers[0].self_attn.qkv_proj.weight is None  # dense copy freed
    h = torch.randn(5, 128)
    with torch.inference_mode():
        for i in range(2):
            m1, m2 = dense.model.layers[i].mlp, packed.model.layers[i].mlp
            torch.testing.assert_close(m2(h), m1(h), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.compute_logits(h), dense.compute_logits(h),
                                   atol=1e-5, rtol=1e-5)


def test_packed_linear_pads_rows_to_few_shapes(tiny_model_factory) -> None:
    """oneDNN keeps a kernel per distinct row count (memory that is never given back), so
    packed layers pad the rows to 8 sizes per power of two; outputs stay exact."""
    from server.model.layers.linear import _onednn_rows

    assert [_onednn_rows(r) for r in (1, 15, 16, 17, 33, 100, 1000, 2047)] == [
        1, 15, 16, 18, 36, 104, 1024, 2048]
    assert len({_onednn_rows(r) for r in range(1, 2049)}) == 72
    path = tiny_model_factory("llama")
    dense, _, _ = load_model(path, show_progress=False, pack_weights=False)
    packed, _, _ = load_model(path, show_progress=False)
    with torch.inference_mode():
        for rows in (17, 100):
            h = torch.randn(rows, 128)
            m1, m2 = dense.model.layers[0].mlp, packed.model.layers[0].mlp
            torch.testing.assert_close(m2(h), m1(h), atol=1e-5, rtol=1e-5)
            assert m2(h).shape == (rows, 128)


def test_warm_onednn_shapes_runs_each_weight_shape_once_per_padded_size(
        tiny_model_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.model.layers import linear as L

    model, arch, _ = load_model(tiny_model_factory("llama"), show_progress=False)
    seen: list[tuple[int, int, int]] = []
    real = L.Linear._onednn_linear

    def record(self, x: torch.Tensor) -> torch.Tensor:
        seen.append((self.in_features, self.out_features, x.shape[0]))
        return real(self, x)

    monkeypatch.setattr(L.Linear, "_onednn_linear", record)
    shapes = {(m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, L.Linear) and m.packed_weight is not None}
    assert len(shapes) == 4  # qkv, o, gate_up, down: one module each, whatever the depth
    n = L.warm_onednn_shapes(model, 40)
    sizes = list(range(1, 17)) + [18, 20, 22, 24, 26, 28, 30, 32, 36, 40]
    assert n == len(seen) == 4 * len(sizes)
    assert sorted(seen) == sorted((i, o, r) for i, o in shapes for r in sizes)


def test_dtype_auto_follows_the_checkpoint(tiny_model_factory, tmp_path: Path) -> None:
    src = tiny_model_factory("llama")
    model, _, dtype = load_model(src, show_progress=False)
    assert dtype == torch.float32
    bf16 = _copy(src, tmp_path / "bf16")
    tensors = {k: v.bfloat16() for k, v in _checkpoint(bf16).items()}
    save_file(tensors, str(bf16 / "model.safetensors"))
    _edit_config(bf16, dtype="bfloat16")
    model, _, dtype = load_model(bf16, show_progress=False, pack_weights=False)
    assert dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])
    _, _, dtype = load_model(bf16, dtype="float32", show_progress=False)
    assert dtype == torch.float32
    _edit_config(bf16, dtype=None, torch_dtype="float16")  # older key name
    assert load_model(bf16, show_progress=False)[2] == torch.float16
    _edit_config(bf16, torch_dtype=None)
    assert load_model(bf16, show_progress=False)[2] == torch.float32
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model(bf16, dtype="int8", show_progress=False)


def test_error_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_error_missing_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path)


def test_error_unsupported_architecture(tiny_model_factory, tmp_path: Path) -> None:
    path = _copy(tiny_model_factory("llama"), tmp_path / "m")
    _edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'") as e:
        load_model(path)
    for name in supported_architectures():
        assert name in str(e.value)


def test_error_no_safetensors(tiny_model_factory, tmp_path: Path) -> None:
    path = _copy(tiny_model_factory("llama"), tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_model(path)


def test_error_missing_weight_is_named(tiny_model_factory, tmp_path: Path) -> None:
    path = _copy(tiny_model_factory("llama"), tmp_path / "m")
    tensors = _checkpoint(path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(path, show_progress=False)


def test_error_missing_shard(tiny_model_factory, tmp_path: Path) -> None:
    path = _copy(tiny_model_factory("qwen2", shards=3), tmp_path / "m")
    victim = sorted(path.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(path)


def test_untied_model_without_lm_head_is_an_error(tiny_model_factory, tmp_path: Path) -> None:
    path = _copy(tiny_model_factory("llama"), tmp_path / "m")
    tensors = _checkpoint(path)
    del tensors["lm_head.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(path, show_progress=False)
    # With no tie_word_embeddings at all, the old library default (tied) applies.
    _edit_config(path, tie_word_embeddings=None)
    model, arch, _ = load_model(path, show_progress=False)
    assert arch.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


BASE = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=1024)


def test_rope_config_new_and_old_styles_agree() -> None:
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 256}
    new = arch_config_from_dict({**BASE, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, **llama3}})
    old = arch_config_from_dict({**BASE, "rope_theta": 500000.0,
                                 "rope_scaling": {"type": "llama3", **llama3}})
    old2 = arch_config_from_dict({**BASE, "rope_theta": 500000.0,
                                  "rope_scaling": {"rope_type": "llama3", **llama3}})
    assert new == old == old2
    assert new.rope_theta == 500000.0
    assert new.rope_scaling == {"rope_type": "llama3", **llama3}
    plain = arch_config_from_dict({**BASE, "rope_parameters": {"rope_type": "default",
                                                              "rope_theta": 10000.0}})
    assert plain.rope_scaling is None and plain.rope_theta == 10000.0
    assert arch_config_from_dict(BASE).rope_theta == 10000.0  # nothing stated


def test_arch_config_fields(tiny_model_factory) -> None:
    q2 = read_arch_config(tiny_model_factory("qwen2"))
    assert (q2.attention_bias, q2.o_proj_bias, q2.qk_norm) == (True, False, False)
    assert q2.num_kv_heads == 2 and q2.head_dim == 32 and q2.sliding_window is None
    assert q2.eos_token_ids == (1,) and q2.bos_token_id == 0 and q2.torch_dtype == "float32"
    q3 = read_arch_config(tiny_model_factory("qwen3") / "config.json")
    assert q3.qk_norm and not q3.attention_bias
    l3 = read_arch_config(tiny_model_factory("llama3"))
    assert l3.num_kv_heads == 1 and l3.tie_word_embeddings
    assert l3.rope_scaling is not None and l3.rope_scaling["rope_type"] == "llama3"
    # Qwen keeps a window size even when sliding is switched off.
    off = arch_config_from_dict({**BASE, "sliding_window": 4096, "use_sliding_window": False})
    assert off.sliding_window is None
    qwen = {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096}
    assert arch_config_from_dict(qwen).sliding_window is None  # Qwen's switch defaults off
    on = arch_config_from_dict({**qwen, "use_sliding_window": True, "max_window_layers": 1})
    assert [on.layer_sliding_window(i) for i in range(2)] == [None, 4096]
    mixed = arch_config_from_dict({**BASE, "sliding_window": 16, "layer_types": [
        "full_attention", "sliding_attention"]})
    assert [mixed.layer_sliding_window(i) for i in range(2)] == [None, 16]
    with pytest.raises(ValueError, match="hidden_act"):
        arch_config_from_dict({**BASE, "hidden_act": "gelu"})


def test_read_eos_token_ids(tiny_model_factory, tmp_path: Path) -> None:
    path = _copy(tiny_model_factory("llama"), tmp_path / "m")
    assert read_eos_token_ids(path) == frozenset({1})
    gen = path / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": [1, 7, 9]}))
    assert read_eos_token_ids(path) == frozenset({1, 7, 9})
    gen.write_text(json.dumps({"bos_token_id": 0}))  # none there: fall back to config.json
    _edit_config(path, eos_token_id=[4, 5])
    assert read_eos_token_ids(path) == frozenset({4, 5})
    gen.unlink()
    _edit_config(path, eos_token_id=None)
    assert read_eos_token_ids(path) == frozenset()


def test_kv_cache_sizes() -> None:
    arch = arch_config_from_dict({**BASE, "num_key_value_heads": 2})
    # 2 (K, V) * 2 layers * 16 slots * 2 heads * 16 dims * 2 bytes
    assert kv_cache_bytes_per_block(arch, 16, torch.bfloat16) == 4096
    assert kv_cache_bytes_per_block(arch, 32, "float32") == 16384
    caches = allocate_kv_cache(arch, 7, 16, torch.float16, "cpu")
    assert len(caches) == 2
    assert all(c.shape == (2, 7, 16, 2, 16) and c.dtype == torch.float16 for c in caches)
    assert caches[0].data_ptr() != caches[1].data_ptr()
    assert not any(bool(c.any()) for c in caches)
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        kv_cache_bytes_per_block(arch, 16, "int4")


def test_registry() -> None:
    assert supported_architectures() == ("LlamaForCausalLM", "MistralForCausalLM",
                                         "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    for name in supported_architectures():
        assert get_model_class(name).__name__ == name
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM"):
        get_model_class("FalconForCausalLM")
