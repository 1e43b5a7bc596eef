"""End to end: logprobs against transformers, seeded sampling, n > 1, stops, aborts, errors."""

from __future__ import annotations

import math

import pytest
import torch

from server import LLM, SamplingParams

LOGPROB_ATOL = 1e-4  # fp32 end to end; bf16 uses its own bound below


@pytest.fixture(scope="module")
def llama_dir(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), dtype="float32", num_kv_blocks=128)


def _hf_logprobs(model_dir, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_prompt_and_sample_logprobs_match_transformers(llm, llama_dir):
    prompt = [5, 77, 300, 12, 9, 401, 33, 250, 18, 6, 91, 120, 7, 64, 200, 11, 42, 99]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                            logprobs=3, prompt_logprobs=2)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    comp = out.outputs[0]
    ref = _hf_logprobs(llama_dir, prompt + comp.token_ids)

    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        tok = prompt[pos]
        assert math.isclose(entry[tok].logprob, ref[pos - 1, tok].item(), abs_tol=LOGPROB_ATOL)
        top = torch.topk(ref[pos - 1], 2).indices.tolist()
        assert set(top) <= set(entry)
        assert entry[tok].rank == int((ref[pos - 1] > ref[pos - 1, tok]).sum()) + 1

    assert len(comp.logprobs) == len(comp.token_ids) == 6
    total = 0.0
    for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert tok == int(row.argmax())
        assert entry[tok].rank == 1
        assert math.isclose(entry[tok].logprob, row[tok].item(), abs_tol=LOGPROB_ATOL)
        assert set(torch.topk(row, 3).indices.tolist()) == set(entry)
        total += row[tok].item()
    assert math.isclose(comp.cumulative_logprob, total, abs_tol=1e-3)


def test_bf16_teacher_forced_logprobs_close_to_transformers(tiny_model_factory):
    """bf16: per-step log-probabilities of reference tokens agree within 0.1 nats."""
    model_dir = tiny_model_factory("qwen2")
    ids = [5, 77, 300, 12, 9, 401, 33, 250, 18, 6, 91, 120, 7, 64, 200, 11, 42, 99, 3, 17]
    llm = LLM(str(model_dir), dtype="bfloat16", num_kv_blocks=32)
    out = llm.generate({"prompt_token_ids": ids},
                       SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ref = _hf_logprobs(model_dir, ids, dtype=torch.bfloat16)
    diffs = [abs(out.prompt_logprobs[p][ids[p]].logprob - ref[p - 1, ids[p]].item())
             for p in range(1, len(ids))]
    assert max(diffs) < 0.1, diffs


def test_seeded_sampling_same_alone_and_in_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12,
                            ignore_eos=True)
    alone = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=t, seed=s, max_tokens=12, ignore_eos=True)
              for t, s in zip([0.0, 1.0, 0.7, 1.3] * 4, [None, 7, None, 99] * 4)]
    prompts = ["Once upon a time"] + [f"Prompt number {i} says" for i in range(15)]
    batch = llm.generate(prompts, [params] + others[:15], use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone
    again = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    different = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=4321,
                               max_tokens=12, ignore_eos=True)
    assert llm.generate("Once upon a time", different,
                        use_tqdm=False)[0].outputs[0].token_ids != alone


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_sequences_share_prompt_blocks(llama_dir, prefix_caching):
    engine = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64,
                 enable_prefix_caching=prefix_caching).engine
    prompt = list(range(10, 50))  # 40 tokens: two full blocks of 16 and a partial one
    engine.add_request("r", {"prompt_token_ids": prompt},
                       SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=4))
    engine.step()
    kv = engine.core.scheduler.kv_cache_manager
    tables = [kv.get_block_ids(f"{i}_r") for i in range(3)]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3  # the partial block is private
    pool = kv.pool
    assert [pool.blocks[b].ref_cnt for b in tables[0][:2]] == [3, 3]
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs) == 1 and [c.index for c in outs[0].outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 4 for c in outs[0].outputs)
    assert kv.num_free_blocks == 64
    # An unrelated request with the same prompt reuses those blocks only with caching on.
    engine.add_request("other", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=3))
    engine.step()
    shared = kv.get_block_ids("other")[:2] == tables[0][:2]
    assert shared == prefix_caching


def test_stop_strings_and_stop_token_ids(llm):
    base = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    full = llm.generate("The quick brown", base, use_tqdm=False)[0].outputs[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = llm.generate("The quick brown", SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    comp = cut.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert comp.text == full.text[: full.text.index(stop)]
    assert full.token_ids[: len(comp.token_ids)] == comp.token_ids

    stop_id = full.token_ids[4]
    by_id = llm.generate("The quick brown", SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id]),
        use_tqdm=False)[0].outputs[0]
    first = full.token_ids.index(stop_id)
    assert by_id.token_ids == full.token_ids[: first + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id

    with_min = llm.generate("The quick brown", SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id],
        min_tokens=first + 1), use_tqdm=False)[0].outputs[0]
    assert len(with_min.token_ids) > first + 1


def test_abort_frees_everything(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64)
    eng = llm.engine
    eng.add_request("a", "Hello there", SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", "General Kenobi", SamplingParams(max_tokens=50, ignore_eos=True,
                                                          n=2))
    eng.step()
    eng.step()
    kv = eng.core.scheduler.kv_cache_manager
    assert kv.num_free_blocks < 64
    eng.abort_request(["a", "b"])
    assert kv.num_free_blocks == 64
    assert not eng.has_unfinished_requests()
    assert eng.step() == []


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"), (dict(top_k=-5), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(stop=[""]), "stop"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(logprobs=-1), "logprobs"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected_before_anything_runs(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 600}, SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate(["fine", {"prompt_token_ids": [5, 10**6]}], use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate("fine", SamplingParams(stop_token_ids=[10**6]), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
