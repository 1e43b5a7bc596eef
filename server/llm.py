"""Offline API, named and behaving like vLLM's: LLM(model=...).generate(prompts, params)."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from server.config import CacheConfig, DType, EngineConfig, ModelConfig, SchedulerConfig
from server.llm_engine import LLMEngine, PromptType
from server.outputs import RequestOutput
from server.sampling_params import SamplingParams


class LLM:
    """Load a Hugging Face model directory and generate with continuous batching.

    Args:
        model: path to a local model directory (config.json + *.safetensors + tokenizer).
        tokenizer: tokenizer directory if different from `model`.
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        max_model_len: context length (default: the model's max_position_embeddings).
        block_size: tokens per KV cache block.
        num_kv_blocks / kv_cache_memory / gpu_memory_utilization: KV cache size, in that
            order of precedence (kv_cache_memory in bytes; default on CPU 4 GiB, or half
            the free memory if that is less).
        enable_prefix_caching: reuse KV blocks of shared prompt prefixes.
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: token budget per engine step (longer prompts are chunked).
        long_prefill_token_threshold: most prompt tokens one request computes in a step
            while others run or wait (0 = no cap).
        priority_aging_steps: a waiting request moves up one priority class per this many
            engine steps (0 = never).
        device: "cpu" or "cuda".
        attention_backend: "auto" (Triton on CUDA, "cpu" on CPU when it builds), "torch"
            (reference), "cpu" (native C++ decode kernel) or "triton".
        quantization: None (dense, or the checkpoint's AWQ int4), "int8" (per-channel) or
            "int4" (group size 128): weight-only quantization of the decoder's linear layers.
        seed: global seed for unseeded random sampling.
    """

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        dtype: DType = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        long_prefill_token_threshold: int = 0,
        priority_aging_steps: int = SchedulerConfig.priority_aging_steps,
        device: str = "cpu",
        attention_backend: str = "auto",
        quantization: str | None = None,
        seed: int = 0,
    ) -> None:
        config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, tokenizer=tokenizer,
                              max_model_len=max_model_len, seed=seed,
                              attention_backend=attention_backend,
                              quantization=quantization),
            cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                              kv_cache_memory=kv_cache_memory,
                              gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      long_prefill_token_threshold=long_prefill_token_threshold,
                                      priority_aging_steps=priority_aging_steps),
            device=device,
        )
        self.engine = LLMEngine(config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: int | Sequence[int] = 0,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of `prompts`.

        A prompt is a string, a list of token ids, or a dict with "prompt" or
        "prompt_token_ids". One SamplingParams applies to all, or pass one per prompt;
        likewise `priority` (lower is scheduled first).
        """
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        priorities = [priority] * len(prompts) if isinstance(priority, int) else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")

        # Validate everything before enqueueing anything, so a bad prompt adds nothing.
        tokenized = []
        for p, sp, prio in zip(prompts, params, priorities):
            text, ids = self.engine.tokenize_prompt(p)
            self.engine.validate(ids, sp, prio)
            tokenized.append({"prompt": text, "prompt_token_ids": ids})
        order = {}
        for p, sp, prio in zip(tokenized, params, priorities):
            order[self.engine.add_request(None, p, sp, priority=prio)] = len(order)
        return self._run(order, use_tqdm)

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        bar = tqdm(total=len(order), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    results[order[out.request_id]] = out
                    bar.update(1)
        except BaseException:
            self.engine.abort_request(list(order))
            raise
        finally:
            bar.close()
        missing = [rid for rid, i in order.items() if results[i] is None]
        if missing:
            raise RuntimeError(f"requests finished without output: {missing[:5]}")
        return results  # type: ignore[return-value]
