"""Request generation for the load generator: prompts, output lengths and arrival times.

Synthetic prompts are lists of token ids, so their lengths are exact: Conveyor and vLLM take
`prompt: [ids]` on /v1/completions as is. Ids are drawn from a pool that leaves out special
tokens (see `token_pool`). Everything is reproducible from a seed: each generator owns its
`random.Random`, and arrivals use a stream of their own so that changing the rate never
changes the prompts.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

# Ids below 100 hold the special and byte-level tokens of most vocabularies; 1000 fits even
# small demo models. Used when no tokenizer is given.
DEFAULT_VOCAB_RANGE = (100, 1000)

# ShareGPT-shaped lengths: lognormal with these means (tokens) and log-space sigma, clipped.
SHAREGPT_INPUT_MEAN, SHAREGPT_OUTPUT_MEAN, SHAREGPT_SIGMA = 200.0, 180.0, 1.0
SHAREGPT_MIN_LEN, SHAREGPT_MAX_LEN = 4, 1024


@dataclass(frozen=True)
class RequestSpec:
    """One request to send. Exactly one of `prompt` (completions) or `messages` (chat) is set.

    `prompt_len` is the exact prompt length in tokens when the prompt is token ids; for text
    and chat prompts only the server knows it (its usage numbers are recorded instead).
    """

    output_len: int
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    prompt_len: int | None = None


def token_pool(vocab_range: tuple[int, int] | None, vocab_size: int | None = None,
               special_ids: Sequence[int] = ()) -> list[int]:
    """The ids random prompts are drawn from: `vocab_range` ([lo, hi)), or with a tokenizer
    (`vocab_size` given) its whole vocabulary, always without the special ids."""
    lo, hi = vocab_range if vocab_range is not None else (
        (0, vocab_size) if vocab_size is not None else DEFAULT_VOCAB_RANGE)
    if vocab_size is not None:
        hi = min(hi, vocab_size)
    specials = set(special_ids)
    pool = [i for i in range(max(lo, 0), hi) if i not in specials]
    if not pool:
        raise ValueError(f"no token ids to sample from in [{lo}, {hi}) without specials")
    return pool


def sample_len(rng: random.Random, mean: int, range_ratio: float) -> int:
    """A length uniform in [mean * (1 - r), mean * (1 + r)], at least 1."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    lo = max(1, math.floor(mean * (1 - range_ratio)))
    hi = max(lo, math.floor(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


def random_ids(rng: random.Random, pool: Sequence[int], n: int) -> list[int]:
    return rng.choices(pool, k=n)


def random_workload(n: int, input_len: int, output_len: int, range_ratio: float,
                    pool: Sequence[int], seed: int) -> list[RequestSpec]:
    """Random token prompts, input and output lengths uniform around the given means."""
    rng = random.Random(seed)
    specs = []
    for _ in range(n):
        ilen = sample_len(rng, input_len, range_ratio)
        olen = sample_len(rng, output_len, range_ratio)
        specs.append(RequestSpec(olen, prompt=random_ids(rng, pool, ilen), prompt_len=ilen))
    return specs


def _lognormal_len(rng: random.Random, mean: float) -> int:
    mu = math.log(mean) - SHAREGPT_SIGMA ** 2 / 2  # so that E[exp(N(mu, s))] = mean
    value = round(rng.lognormvariate(mu, SHAREGPT_SIGMA))
    return min(max(value, SHAREGPT_MIN_LEN), SHAREGPT_MAX_LEN)


def sharegpt_lengths(n: int, seed: int, max_model_len: int | None = None,
                     prompt_growth: float = 1.0, prompt_overhead: int = 0
                     ) -> list[tuple[int, int]]:
    """(input, output) lengths shaped like ShareGPT conversations (means about 200 / 180).

    With `max_model_len`, prompts keep to half the context and outputs to the rest, where a
    prompt counts as `ilen * prompt_growth + prompt_overhead` tokens: chat prompts are decoded
    text, re-tokenized (random ids grow by about a third) and wrapped in a template.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        ilen, olen = _lognormal_len(rng, SHAREGPT_INPUT_MEAN), _lognormal_len(
            rng, SHAREGPT_OUTPUT_MEAN)
        if max_model_len is not None:
            ilen = min(ilen, max(max_model_len // 2, 1))
            served = math.ceil(ilen * prompt_growth) + prompt_overhead
            olen = max(1, min(olen, max_model_len - served))
        pairs.append((ilen, olen))
    return pairs


def sharegpt_synthetic_workload(n: int, pool: Sequence[int], seed: int,
                                max_model_len: int | None = None, prompt_growth: float = 1.0,
                                prompt_overhead: int = 0) -> list[RequestSpec]:
    """ShareGPT-shaped lengths with random token prompts."""
    rng = random.Random(f"sharegpt-text-{seed}")
    lengths = sharegpt_lengths(n, seed, max_model_len, prompt_growth, prompt_overhead)
    return [RequestSpec(olen, prompt=random_ids(rng, pool, ilen), prompt_len=ilen)
            for ilen, olen in lengths]


def prefix_workload(n: int, groups: int, prefix_len: int, input_len: int, output_len: int,
                    range_ratio: float, pool: Sequence[int], seed: int) -> list[RequestSpec]:
    """`groups` shared prefixes of `prefix_len` tokens; request i uses prefix i % groups and a
    unique random suffix of about `input_len` tokens (the prefix-caching workload)."""
    if groups < 1:
        raise ValueError(f"prefix groups must be at least 1, got {groups}")
    rng = random.Random(seed)
    prefixes = [random_ids(rng, pool, prefix_len) for _ in range(groups)]
    specs = []
    for i in range(n):
        suffix = random_ids(rng, pool, sample_len(rng, input_len, range_ratio))
        olen = sample_len(rng, output_len, range_ratio)
        ids = prefixes[i % groups] + suffix
        specs.append(RequestSpec(olen, prompt=ids, prompt_len=len(ids)))
    return specs


def _jsonl_spec(obj: object, default_output_len: int, where: str) -> RequestSpec:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    olen = obj.get("output_len", default_output_len)
    if not isinstance(olen, int) or olen < 1:
        raise ValueError(f"{where}: output_len must be a positive integer")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise ValueError(f"{where}: messages must be a list of objects")
        return RequestSpec(olen, messages=msgs)
    prompt = obj.get("prompt")
    if isinstance(prompt, str) and prompt:
        return RequestSpec(olen, prompt=prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return RequestSpec(olen, prompt=prompt, prompt_len=len(prompt))
    raise ValueError(f"{where}: needs a non-empty 'prompt' (text or token ids) or 'messages'")


def jsonl_workload(path: Path, n: int, default_output_len: int) -> list[RequestSpec]:
    """Requests from a JSONL file, in file order, repeated when it has fewer than `n` lines.

    Each line: {"prompt": "text" | [ids], "output_len"?: int} or {"messages": [...], ...}.
    """
    specs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({exc})") from None
                specs.append(_jsonl_spec(obj, default_output_len, f"{path}:{lineno}"))
    if not specs:
        raise ValueError(f"{path}: no requests")
    return [specs[i % len(specs)] for i in range(n)]


def as_chat(specs: Sequence[RequestSpec],
            decode: Callable[[list[int]], str] | None) -> list[RequestSpec]:
    """Turns completion prompts into one user message each (token ids decoded with `decode`);
    the prompt length is then the server's to count (the chat template adds tokens)."""
    out = []
    for s in specs:
        if s.messages is not None:
            out.append(s)
            continue
        text = s.prompt
        if not isinstance(text, str):
            if decode is None:
                raise ValueError("chat prompts from token ids need a tokenizer to decode them")
            text = decode(list(text or []))
        out.append(replace(s, prompt=None, prompt_len=None,
                           messages=[{"role": "user", "content": text}]))
    return out


def inter_arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """`n` gaps (seconds) between arrivals: gamma with shape `burstiness` and mean 1 / rate.

    Burstiness 1 is a Poisson process; below 1 arrivals bunch up, above 1 they even out.
    A rate of inf sends everything at once (all gaps 0).
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be positive, got {rate}, {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals-{seed}")
    scale = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(n)]


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """When each request is due, in seconds from the start; the first goes at once."""
    offsets, t = [], 0.0
    for gap in [0.0, *inter_arrival_gaps(max(n - 1, 0), rate, burstiness, seed)][:n]:
        t += gap
        offsets.append(t)
    return offsets


@dataclass(frozen=True)
class TokenizerInfo:
    """What the load generator needs from a tokenizer: its ids and a decoder."""

    vocab_size: int
    special_ids: tuple[int, ...]
    decode: Callable[[list[int]], str]


def load_tokenizer(path: str) -> TokenizerInfo:
    """A tokenizer directory (or tokenizer.json): read with the `tokenizers` library when it
    has a tokenizer.json (no torch), else with transformers' AutoTokenizer."""
    p = Path(path)
    file = p if p.is_file() else p / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(file))
        specials = tuple(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        return TokenizerInfo(tok.get_vocab_size(with_added_tokens=True), specials,
                             lambda ids: tok.decode(ids, skip_special_tokens=True))
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    return TokenizerInfo(len(hf), tuple(hf.all_special_ids),
                         lambda ids: hf.decode(ids, skip_special_tokens=True))
