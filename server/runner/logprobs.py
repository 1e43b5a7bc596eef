"""Logprobs of chosen tokens (sampled or prompt) with their rank and the top-k alternatives.

Tensors stay on the device as one (token_ids, logprobs, ranks) triple; `to_logprobs` and
`to_prompt_logprobs` convert it to the Python structures of server/engine/outputs.py
with one small .tolist() per tensor.
"""

from __future__ import annotations

import torch

from server.engine.outputs import Logprobs

LogprobsTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                    num_logprobs: int) -> LogprobsTensors:
    """From log-probabilities [N, V] and chosen ids [N]: ids and logprobs [N, 1 + k], ranks [N].

    Column 0 is the chosen token; the rank counts tokens strictly more likely, plus one.
    """
    token_ids = token_ids.to(torch.long)
    chosen = logprobs.gather(-1, token_ids.unsqueeze(-1))
    ranks = (logprobs > chosen).sum(-1) + 1
    k = min(num_logprobs, logprobs.shape[-1])
    if k <= 0:
        return token_ids.unsqueeze(-1), chosen, ranks
    top_vals, top_ids = logprobs.topk(k, dim=-1)
    return (torch.cat([token_ids.unsqueeze(-1), top_ids], dim=-1),
            torch.cat([chosen, top_vals], dim=-1), ranks)


def compute_prompt_logprobs(logits: torch.Tensor, target_token_ids: torch.Tensor,
                            num_logprobs: int) -> LogprobsTensors:
    """Logprobs of each prompt target token from raw logits [N, V] (row i scores target i)."""
    return gather_logprobs(torch.log_softmax(logits.float(), dim=-1), target_token_ids,
                           num_logprobs)


def to_logprobs(token_ids: torch.Tensor, logprobs: torch.Tensor, ranks: torch.Tensor,
                num_per_row: list[int]) -> list[Logprobs]:
    """One single-position Logprobs per row, each trimmed to its own 1 + num_per_row[i]."""
    ids, lps, rks = token_ids.tolist(), logprobs.tolist(), ranks.tolist()
    return [Logprobs(token_ids=[ids[i][:1 + n]], logprobs=[lps[i][:1 + n]], ranks=[rks[i]])
            for i, n in enumerate(num_per_row)]


def to_prompt_logprobs(token_ids: torch.Tensor, logprobs: torch.Tensor, ranks: torch.Tensor,
                       num_logprobs: int) -> Logprobs:
    """All rows as the consecutive positions of one request's prompt."""
    n = 1 + num_logprobs
    return Logprobs(token_ids=[row[:n] for row in token_ids.tolist()],
                    logprobs=[row[:n] for row in logprobs.tolist()],
                    ranks=ranks.tolist())
