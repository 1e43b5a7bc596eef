"""Runs one scheduled step: builds the flat batch, runs the model, samples.

Keeps each request's token ids and block table between steps, so the scheduler
sends new requests once and only diffs afterwards.
"""

from __future__ import annotations

import torch

from server.engine.outputs import RunnerOutput, SchedulerOutput
from server.model.attn_metadata import AttentionMetadata
from server.runner.input_batch import CachedRequestState, FlatBatch, build_flat_batch
from server.runner.sampler import (
    Sampler,
    SamplingMetadata,
    compute_prompt_logprobs,
    to_logprobs,
    to_prompt_logprobs,
)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}

    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids | sched.preempted_req_ids:
            self.requests.pop(req_id, None)
        for new in sched.scheduled_new_reqs:
            sp = new.sampling_params
            gen = None
            if sp.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(sp.seed)
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=new.prompt_token_ids,
                output_token_ids=list(new.output_token_ids),
                sampling_params=sp,
                generator=gen,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
            )
        for cached in sched.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _order(self, sched: SchedulerOutput) -> tuple[list[CachedRequestState], list[int]]:
        """Decode rows (one new token) first, as the attention metadata requires."""
        ones, many = [], []
        for req_id, n in sched.num_scheduled_tokens.items():
            (ones if n == 1 else many).append((self.requests[req_id], n))
        pairs = ones + many
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _attn_metadata(self, batch: FlatBatch) -> AttentionMetadata:
        dev = self.device
        return AttentionMetadata(
            num_actual_tokens=int(batch.query_start_loc[-1]),
            slot_mapping=batch.slot_mapping.to(dev),
            query_start_loc=torch.from_numpy(batch.query_start_loc).to(dev, torch.int32),
            query_start_loc_cpu=batch.query_start_loc.tolist(),
            seq_lens=torch.from_numpy(batch.seq_lens).to(dev, torch.int32),
            seq_lens_cpu=batch.seq_lens.tolist(),
            block_tables=batch.block_tables.to(dev),
            max_query_len=int(batch.query_lens.max()),
            max_seq_len=int(batch.seq_lens.max()),
            num_decodes=batch.num_decodes,
            block_size=self.block_size,
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._update_states(sched)
        out = RunnerOutput()
        if sched.total_num_scheduled_tokens == 0:
            return out
        states, num_sched = self._order(sched)
        batch = build_flat_batch(states, num_sched, self.block_size)
        meta = self._attn_metadata(batch)
        hidden = self.model(
            batch.input_ids.to(self.device), batch.positions.to(self.device),
            self.kv_caches, meta,
        )

        # A request samples once its computed tokens reach all its known tokens.
        sample_rows, sample_states = [], []
        for i, s in enumerate(states):
            if int(batch.seq_lens[i]) >= len(s.token_ids):
                sample_rows.append(int(batch.query_start_loc[i + 1]) - 1)
                sample_states.append(s)
        self._prompt_logprobs(states, batch, hidden, out)
        if not sample_states:
            return out

        logits = self.model.compute_logits(hidden[sample_rows])
        sm = SamplingMetadata.build(
            params=[s.sampling_params for s in sample_states],
            prompt_token_ids=[s.prompt_token_ids for s in sample_states],
            output_token_ids=[s.output_token_ids for s in sample_states],
            generators=[s.generator for s in sample_states],
            eos_token_ids=[self.eos_token_ids] * len(sample_states),
            vocab_size=self.vocab_size,
            device=self.device,
        )
        result = self.sampler(logits, sm)
        token_ids = result.sampled_token_ids.tolist()
        for s, tok in zip(sample_states, token_ids):
            s.append_output(tok)
            out.sampled_token_ids[s.req_id] = [tok]
        if result.logprobs is not None:
            wanted = [s.sampling_params.logprobs for s in sample_states]
            per_row = to_logprobs(*result.logprobs, num_per_row=[w or 0 for w in wanted])
            for s, w, lp in zip(sample_states, wanted, per_row):
                if w is not None:
                    out.logprobs[s.req_id] = lp
        return out

    def _prompt_logprobs(self, states: list[CachedRequestState], batch: FlatBatch,
                         hidden: torch.Tensor, out: RunnerOutput) -> None:
        """Logprobs of prompt tokens scored in this chunk: position p scores token p + 1."""
        for i, s in enumerate(states):
            k = s.sampling_params.prompt_logprobs
            start = int(batch.seq_lens[i] - batch.query_lens[i])
            if k is None or start >= s.num_prompt_tokens - 1:
                continue
            end = min(int(batch.seq_lens[i]), s.num_prompt_tokens - 1)
            row0 = int(batch.query_start_loc[i])
            logits = self.model.compute_logits(hidden[row0:row0 + end - start])
            targets = torch.tensor(s.prompt_token_ids[start + 1:end + 1], device=self.device)
            triple = compute_prompt_logprobs(logits, targets, k)
            out.prompt_logprobs[s.req_id] = to_prompt_logprobs(*triple, num_logprobs=k)
