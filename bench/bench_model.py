"""The benchmark model: a random-weight ~110M-parameter Llama with a 32k BPE tokenizer.

Built locally (no hub): the tokenizer is trained on pseudo-words so that its 32000
entries are real merges and decoding costs what a real tokenizer costs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB = 32000
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=12)


def _corpus(seed: int, n_words: int = 400_000) -> list[str]:
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - i for i in range(26)]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(20_000)]
    return [" ".join(rng.choices(words, k=200)) for _ in range(n_words // 200)]


def build_tokenizer(out_dir: Path, seed: int = 0) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out_dir))


def build_bench_model(out_dir: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write the model once; later calls reuse the directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, **SHAPE)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(str(out_dir))
    build_tokenizer(out_dir, seed)
    gen = out_dir / "generation_config.json"
    data = json.loads(gen.read_text()) if gen.exists() else {}
    data["eos_token_id"] = 1
    gen.write_text(json.dumps(data))
    return out_dir


def num_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += _prod(sf.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
