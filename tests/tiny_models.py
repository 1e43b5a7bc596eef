"""Tiny random-weight Hugging Face models and an offline-trained tokenizer for tests.

Everything here is built locally: nothing touches a model hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>: {% endif %}"
)

CORPUS = [
    "Beautiful code is better than clever code. Simple beats complex; flat beats nested.",
    "Errors should never pass silently, and readability counts in every module.",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A paged KV cache stores keys and values in fixed-size blocks of memory.",
    "Continuous batching admits new requests at every step of the engine loop.",
    "Once upon a time there was a small model that learned to count: 1, 2, 3, 4, 5.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Unicode text: café, naïve, 東京, ü, ß, emoji 🙂 and more.",
]


def build_tokenizer(out_dir: Path) -> None:
    """Train a small byte-level BPE tokenizer and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


ARCH_CONFIGS = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "llama3": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "mistral": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", num_key_value_heads=2,
        tie_word_embeddings=False, sliding_window=None,
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_key_value_heads=2,
        tie_word_embeddings=False, head_dim=32,
    ),
}


def _hf_config(arch: str, **overrides):
    from transformers import AutoConfig

    spec = dict(ARCH_CONFIGS[arch])
    model_type = spec.pop("model_type")
    base = dict(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )
    base.update(spec)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def build_model(
    out_dir: Path, arch: str = "llama", seed: int = 0, shards: int = 1,
    tokenizer_dir: Path | None = None, **config_overrides,
) -> Path:
    """Save a random-weight model of `arch` with a tokenizer into `out_dir`, return the path.

    Weights are scaled up so that greedy decoding does not collapse onto one token.
    `shards > 1` writes a sharded checkpoint with model.safetensors.index.json.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = _hf_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.eval()
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(str(out_dir), max_shard_size=max(total // shards, 1))
    else:
        model.save_pretrained(str(out_dir))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            (out_dir / f.name).write_bytes(f.read_bytes())
    else:
        build_tokenizer(out_dir)
    gen = out_dir / "generation_config.json"
    if gen.exists():
        data = json.loads(gen.read_text())
        data["eos_token_id"] = 1
        gen.write_text(json.dumps(data))
    return out_dir


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int,
              dtype: torch.dtype = torch.float32) -> list[int]:
    """Reference: transformers' greedy generate for one prompt, new tokens only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()
