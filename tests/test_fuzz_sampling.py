"""Hypothesis over SamplingParams through the offline engine (a tiny model, built once).

For any valid combination generation never raises and every sequence obeys max_tokens,
min_tokens, stop strings, stop token ids and logprobs counts; for any invalid one the
error is a ValueError (from SamplingParams or from generate), never something else.
Examples are derandomized, so CI is reproducible.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import LLM, SamplingParams
from server.outputs import CompletionOutput
from tests.tiny_models import VOCAB_SIZE

MAX_MODEL_LEN = 32
EOS = 1
PROMPTS = ["The quick brown fox", "Errors should never pass", "def add(a, b):", "1, 2, 3,"]
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Short stop strings over common characters, so they really occur in the output.
stop_text = st.text(alphabet="etaoins .,\n", min_size=1, max_size=2)


@st.composite
def valid_params(draw: st.DrawFn) -> dict[str, Any]:
    max_tokens = draw(st.one_of(st.integers(1, 12), st.just(None)))
    kw: dict[str, Any] = dict(
        n=draw(st.integers(1, 3)),
        temperature=draw(st.one_of(st.just(0.0), st.floats(0.05, 2.0))),
        top_p=draw(st.floats(0.05, 1.0)),
        top_k=draw(st.one_of(st.just(-1), st.integers(0, 40))),
        min_p=draw(st.floats(0.0, 0.5)),
        seed=draw(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1))),
        max_tokens=max_tokens,
        min_tokens=draw(st.one_of(st.just(0), st.integers(0, min(max_tokens or 8, 8)))),
        stop=draw(st.one_of(st.none(), stop_text, st.lists(stop_text, max_size=3))),
        stop_token_ids=draw(st.one_of(st.none(), st.lists(st.integers(0, VOCAB_SIZE - 1),
                                                          max_size=4))),
        ignore_eos=draw(st.booleans()),
        presence_penalty=draw(st.floats(-2.0, 2.0)),
        frequency_penalty=draw(st.floats(-2.0, 2.0)),
        repetition_penalty=draw(st.floats(0.5, 2.0)),
        logit_bias=draw(st.one_of(st.none(), st.dictionaries(
            st.integers(0, VOCAB_SIZE - 1), st.floats(-100.0, 100.0), max_size=3))),
        logprobs=draw(st.one_of(st.none(), st.integers(0, 5))),
        include_stop_str_in_output=draw(st.booleans()),
    )
    if draw(st.booleans()):
        # Push EOS up so that EOS finishes (and min_tokens holding them back) happen.
        kw["logit_bias"] = {**(kw["logit_bias"] or {}), EOS: draw(st.floats(5.0, 100.0))}
    return kw


# Each one breaks exactly one rule; the rest of the params stay at their defaults.
INVALID = st.one_of(
    st.fixed_dictionaries({"n": st.integers(-3, 0)}),
    st.fixed_dictionaries({"temperature": st.one_of(st.floats(-5.0, -0.001),
                                                    st.sampled_from([math.nan, math.inf]))}),
    st.fixed_dictionaries({"top_p": st.one_of(st.floats(-1.0, 0.0), st.floats(1.001, 5.0))}),
    st.fixed_dictionaries({"top_k": st.integers(-100, -2)}),
    st.fixed_dictionaries({"min_p": st.one_of(st.floats(-1.0, -0.001), st.floats(1.001, 3))}),
    st.fixed_dictionaries({"seed": st.one_of(st.integers(2**64, 2**80),
                                             st.integers(-(2**80), -(2**63) - 1))}),
    st.fixed_dictionaries({"max_tokens": st.integers(-5, 0)}),
    st.fixed_dictionaries({"max_tokens": st.integers(1, 4), "min_tokens": st.integers(5, 9)}),
    st.fixed_dictionaries({"min_tokens": st.integers(-5, -1)}),
    st.fixed_dictionaries({"presence_penalty": st.floats(2.001, 10.0)}),
    st.fixed_dictionaries({"frequency_penalty": st.floats(-10.0, -2.001)}),
    st.fixed_dictionaries({"repetition_penalty": st.one_of(st.floats(-1.0, 0.0),
                                                           st.floats(2.001, 9.0))}),
    st.fixed_dictionaries({"stop": st.one_of(st.just(""), st.just(["a", ""]))}),
    st.fixed_dictionaries({"stop_token_ids": st.lists(st.integers(-9, -1), min_size=1)}),
    st.fixed_dictionaries({"stop_token_ids": st.lists(st.integers(VOCAB_SIZE, 10**6),
                                                      min_size=1)}),
    st.fixed_dictionaries({"logit_bias": st.dictionaries(st.integers(0, 10), st.floats(
        100.001, 1e6), min_size=1)}),
    st.fixed_dictionaries({"logit_bias": st.dictionaries(st.integers(VOCAB_SIZE, 10**6),
                                                         st.just(1.0), min_size=1)}),
    st.fixed_dictionaries({"logprobs": st.integers(-5, -1)}),
    st.fixed_dictionaries({"prompt_logprobs": st.integers(-5, -1)}),
)


@pytest.fixture(scope="module")
def llm(tiny_model_factory) -> LLM:
    return LLM(str(tiny_model_factory("llama")), dtype="float32", num_kv_blocks=64,
               max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=128)


def check_sequence(out: CompletionOutput, params: SamplingParams, limit: int) -> None:
    tokens, text = out.token_ids, out.text
    stops = params.stop_strings
    assert out.finish_reason in ("stop", "length")
    assert params.min_tokens <= len(tokens) <= limit
    if out.finish_reason == "length":
        assert len(tokens) == limit and out.stop_reason is None
    elif isinstance(out.stop_reason, str):  # a stop string
        assert out.stop_reason in stops
        if params.include_stop_str_in_output:
            assert text.endswith(out.stop_reason)
            text = text[: len(text) - len(out.stop_reason)]
        else:
            assert out.stop_reason not in text or params.min_tokens > 0
    elif out.stop_reason is not None:  # a stop token id: the last token, kept in token_ids
        assert out.stop_reason in params.stop_token_ids and tokens[-1] == out.stop_reason
    else:  # EOS
        assert not params.ignore_eos and tokens[-1] == EOS
    if params.min_tokens == 0:
        # A stop string that was allowed to match would have ended the text there.
        assert not any(s in text for s in stops), (text, stops)
    if params.logprobs is not None:
        assert out.logprobs is not None and len(out.logprobs) == len(tokens)
        for tok, position in zip(tokens, out.logprobs):
            assert tok in position
            assert max(params.logprobs, 1) <= len(position) <= params.logprobs + 1
    else:
        assert out.logprobs is None


def add_stops_from_a_probe(llm: LLM, kw: dict[str, Any], prompt: str,
                           data: st.DataObject) -> dict[str, Any]:
    """Random stops rarely occur in a random model's output; for a reproducible request
    (greedy or seeded), take a stop string and a stop token from a first run's output."""
    probe = SamplingParams(**{**kw, "stop": None, "stop_token_ids": None})
    first = llm.generate([prompt], probe, use_tqdm=False)[0].outputs[0]
    kw = dict(kw)
    if first.text and data.draw(st.booleans(), label="stop string from the probe"):
        start = data.draw(st.integers(0, len(first.text) - 1))
        stop = first.text[start:start + data.draw(st.integers(1, 3))]
        kw["stop"] = [stop, *SamplingParams(stop=kw["stop"]).stop_strings]
    if data.draw(st.booleans(), label="stop token from the probe"):
        kw["stop_token_ids"] = [data.draw(st.sampled_from(first.token_ids))]
    return kw


@given(kw=valid_params(), prompt=st.sampled_from(PROMPTS), data=st.data())
@FUZZ
def test_valid_params_never_crash_and_obey_limits(llm: LLM, kw: dict[str, Any],
                                                  prompt: str, data: st.DataObject) -> None:
    if kw["temperature"] == 0.0 or kw["seed"] is not None:
        kw = add_stops_from_a_probe(llm, kw, prompt, data)
    params = SamplingParams(**kw)
    (result,) = llm.generate([prompt], params, use_tqdm=False)
    prompt_len = len(result.prompt_token_ids)
    room = MAX_MODEL_LEN - prompt_len
    limit = room if params.max_tokens is None else min(params.max_tokens, room)
    assert sorted(o.index for o in result.outputs) == list(range(params.n))
    for out in result.outputs:
        check_sequence(out, params, limit)
    if params.temperature == 0.0 and params.n > 1:
        # Greedy siblings are one sequence n times.
        assert all(o.token_ids == result.outputs[0].token_ids for o in result.outputs)


@given(kw=INVALID, prompt=st.sampled_from(PROMPTS))
@FUZZ
def test_invalid_params_raise_value_error(llm: LLM, kw: dict[str, Any], prompt: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT012 - either step may be the one to refuse
        params = SamplingParams(**kw)
        llm.generate([prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing was half-added


@pytest.mark.parametrize("prompt", [
    {"prompt_token_ids": []},
    {"prompt_token_ids": [VOCAB_SIZE]},
    {"prompt_token_ids": [-1, 5]},
    {"prompt_token_ids": [5] * (MAX_MODEL_LEN + 1)},
])
def test_invalid_prompts_raise_value_error(llm: LLM, prompt: dict) -> None:
    with pytest.raises(ValueError):
        llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
