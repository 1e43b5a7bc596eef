"""Top-k / top-p / min-p truncation without sorting the whole vocabulary.

The kept set is found among each row's top-K candidates (K adapts, rows that do not
fit retry wider); only nuclei too big for that fall back to a histogram of the row's values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from server.runner.draw import invert_cdf, sample_from_probs, take_rows

# First top-p candidate width, and the range the sampler tunes it in. A nucleus usually
# holds a few to a few hundred tokens; rows whose nucleus does not fit retry wider.
TOP_P_WIDTH = 128
_MIN_TOP_P_WIDTH = 32
_MAX_TOP_P_WIDTH = 2048
# A retry gathers at least this many times more candidates, or a full sort past V / 2.
_GROWTH = 16
# Rows keeping more tokens than this draw over the masked vocabulary instead: sorting a
# huge kept set into id order costs more than one more pass over the row.
_MAX_CANDIDATE_DRAW = 4096
# Value ranges per row when a nucleus is too big for a topk (see _histogram_stages).
_BINS = 1024


@dataclass
class _Stage:
    """Rows of the truncated batch whose kept set lies within their top-K candidates."""

    rows: torch.Tensor | None  # indices into the truncated rows; None = all of them
    # [N] the smallest logit top-k / top-p keep (-inf if neither cuts); min-p comes on top.
    threshold: torch.Tensor
    kept: torch.Tensor  # [N] how many tokens each row keeps
    batch: _TruncatedStages
    # The candidates; None only when every row keeps more than _MAX_CANDIDATE_DRAW.
    values: torch.Tensor | None = None  # [N, K] the K largest logits of each row, descending
    ids: torch.Tensor | None = None  # [N, K] their token ids
    probs: torch.Tensor | None = None  # [N, K] their probabilities
    keep: torch.Tensor | None = None  # [N, K] bool: the tokens that may be drawn

    def sample(self, u: torch.Tensor) -> torch.Tensor:
        """One token per row by inverting the CDF of its kept tokens at u [N] in [0, 1).

        Both ways below walk the kept tokens in token-id order, and which way a row takes
        depends only on its own kept set, so a row draws the same token in every stage.
        """
        small = self.kept <= _MAX_CANDIDATE_DRAW
        if bool(small.all()):
            return self._sample_candidates(u, None)
        out = torch.empty_like(u, dtype=torch.long)
        part = small.nonzero().squeeze(-1)
        if part.numel():
            out[part] = self._sample_candidates(u[part], part)
        part = (~small).nonzero().squeeze(-1)
        out[part] = self._sample_vocab(u[part], part)
        return out

    def _sample_candidates(self, u: torch.Tensor, part: torch.Tensor | None) -> torch.Tensor:
        """Over the candidates, sorted into id order: tokens tied in value (whose order topk
        and sort leave open) then map to the same interval of u whatever K was."""
        keep, ids, probs = self.keep, self.ids, self.probs
        assert keep is not None and ids is not None and probs is not None
        if part is not None:
            keep, ids, probs = keep[part], ids[part], probs[part]
        width = _kept_width(keep)
        keep = keep[:, :width]
        ids, order = ids[:, :width].masked_fill(~keep, _SENTINEL).sort(dim=-1)
        weights = probs[:, :width].gather(-1, order).double()
        weights.masked_fill_(ids == _SENTINEL, 0.0)
        pos = invert_cdf(weights.cumsum(dim=-1), u)
        return ids.gather(-1, pos.unsqueeze(-1)).squeeze(-1)

    def _sample_vocab(self, u: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """Over the whole vocabulary with every token outside the kept set zeroed."""
        rows = part if self.rows is None else self.rows[part]
        b = self.batch
        threshold = self.threshold[part].unsqueeze(-1)
        if rows.numel() == b.probs.shape[0]:  # every row of the batch: no copies
            probs = b.probs.masked_fill(b.logits < threshold, 0.0)
        else:
            probs = b.probs[rows].masked_fill_(b.logits[rows] < threshold, 0.0)
        if b.min_p is not None:
            probs = apply_min_p(probs, take_rows(b.min_p, rows))
        return sample_from_probs(probs, u)


def _kept_width(keep: torch.Tensor) -> int:
    """Columns up to the last kept candidate of any row (keep [N, K], at least one per row)."""
    pos = torch.arange(1, keep.shape[-1] + 1, device=keep.device)
    return int((keep * pos).amax())


# Sorts after every real token id.
_SENTINEL = torch.iinfo(torch.long).max


class _TruncatedStages:
    """Iterates the rows of a truncated batch in stages of widening candidate sets.

    The first stage takes the top-K of every row, K the largest top-k (+1, to see past
    ties) or the top-p width; rows whose kept set may reach past their K candidates retry
    wider, up to a full sort. A row's kept set and sample do not depend on the stage that
    settles it: the kept set is defined by values, and the nucleus mass is a prefix sum
    over the same descending values in every stage.
    """

    def __init__(self, logits: torch.Tensor, probs: torch.Tensor, top_k: torch.Tensor | None,
                 max_top_k: int, top_p: torch.Tensor | None, min_p: torch.Tensor | None,
                 top_p_width: int) -> None:
        self.logits, self.probs = logits, probs
        self.top_k, self.top_p, self.min_p = top_k, top_p, min_p
        self.vocab = logits.shape[-1]
        if top_p is None:
            # Top-k alone: the largest k, plus one to see whether ties reach past it.
            width = max_top_k + 1
        else:
            width = top_p_width
            # A huge top-k would make every top-p row pay for it; those rows retry instead.
            if top_k is not None and max_top_k < _MAX_TOP_P_WIDTH:
                width = max(width, max_top_k + 1)
        self.first_width = width
        self.next_width = top_p_width

    def __iter__(self) -> Iterator[_Stage]:
        pending: list[tuple[torch.Tensor | None, int]] = [(None, self.first_width)]
        while pending:
            rows, width = pending.pop()
            if 2 * width >= self.vocab:
                width = self.vocab
                if self._no_top_k(rows):
                    yield from self._histogram_stages(rows)
                    continue
            stage, failed, need = self._stage(rows, width)
            if rows is None and self.top_p is not None:
                self._tune(stage, failed)
            if stage is not None:
                yield stage
            if failed is None:
                continue
            if stage is None and rows is None:
                retry = None  # every row failed: keep indexing nothing
            else:
                retry = failed if rows is None else rows[failed]
            # Rows whose lower bound is past V / 2 go straight to a sort, the rest share one
            # topk as wide as the widest of them needs.
            need = need.clamp(min=width * _GROWTH)
            # Past _MAX_TOP_P_WIDTH a top-p row is cheaper to settle by histogram.
            to_sort = 2 * need >= self.vocab
            if self._no_top_k(retry):
                to_sort |= need > _MAX_TOP_P_WIDTH
            if bool(to_sort.all()):
                pending.append((retry, self.vocab))
                continue
            if retry is None:
                retry = failed
            if bool(to_sort.any()):
                pending.append((retry[to_sort], self.vocab))
            pending.append((retry[~to_sort], int(need[~to_sort].max())))

    def _no_top_k(self, rows: torch.Tensor | None) -> bool:
        """Whether these rows are cut by top-p alone (the histogram's case)."""
        if self.top_p is None:
            return False
        if self.top_k is None:
            return True
        k = self.top_k if rows is None else self.top_k[rows]
        return bool((k >= self.vocab).all())

    def _stage(self, rows: torch.Tensor | None, width: int
               ) -> tuple[_Stage | None, torch.Tensor | None, torch.Tensor]:
        """The stage of rows settled by their top-`width`, the failed ones (indices into
        rows) and a lower bound on the width each failed row needs."""
        x = self.logits if rows is None else self.logits[rows]
        complete = width >= self.vocab
        if complete:
            values, ids = x.sort(dim=-1, descending=True)
        else:
            values, ids = x.topk(width, dim=-1)
        probs = (self.probs if rows is None else self.probs[rows]).gather(-1, ids)
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        keep, threshold, ok, need = _keep_candidates(
            values, probs, None if self.top_k is None else sel(self.top_k),
            None if self.top_p is None else sel(self.top_p),
            None if self.min_p is None else sel(self.min_p), self.vocab, complete)
        kept = keep.count_nonzero(dim=-1)
        if bool(ok.all()):
            return _Stage(rows, threshold, kept, self, values, ids, probs, keep), None, need
        good = ok.nonzero().squeeze(-1)
        failed = (~ok).nonzero().squeeze(-1)
        stage = None
        if good.numel():
            stage = _Stage(good if rows is None else rows[good], threshold[good], kept[good],
                           self, values[good], ids[good], probs[good], keep[good])
        return stage, failed, need[failed]

    def _histogram_stages(self, rows: torch.Tensor | None) -> Iterator[_Stage]:
        """Settle top-p rows (without top-k) whose nucleus is too big for a topk, no sort.

        The float64 mass of _BINS equal value ranges per row finds the bin where the
        nucleus ends: bins above it are kept whole, bins below dropped, and only the
        tokens of that one bin are ranked. Ties share a bin, so they stay together.
        """
        assert self.top_p is not None
        x = self.logits if rows is None else self.logits[rows]
        probs = self.probs if rows is None else self.probs[rows]
        top_p = self.top_p if rows is None else self.top_p[rows]
        neg_inf = float("-inf")
        hi = x.amax(dim=-1, keepdim=True)
        lo = x.masked_fill(x == neg_inf, float("inf")).amin(dim=-1, keepdim=True)
        span = (hi - lo).clamp_(min=torch.finfo(x.dtype).tiny)
        # Monotone in x (bin 0 holds the largest); -inf lands in the last bin. The scaled
        # distance is never negative, so truncating to long floors it.
        bins = (hi - x).mul_(_BINS / span).clamp_(max=_BINS - 1).long()
        mass = torch.zeros(x.shape[0], _BINS, dtype=torch.float64, device=x.device)
        mass.scatter_add_(-1, bins, probs.double())
        cum = mass.cumsum(dim=-1)
        goal = top_p.double().unsqueeze(-1)  # a share of the softmax mass, which is 1
        cross = (cum < goal).sum(dim=-1, keepdim=True).clamp_(max=_BINS - 1)
        above = cum.gather(-1, (cross - 1).clamp(min=0)).masked_fill_(cross == 0, 0.0)
        in_bin = bins == cross
        width = int(in_bin.count_nonzero(dim=-1).max())
        values, ids = x.masked_fill(~in_bin, neg_inf).topk(width, dim=-1)
        valid = in_bin.gather(-1, ids)
        weights = probs.gather(-1, ids).double().masked_fill_(~valid, 0.0)
        before = torch.cat([above, (above + weights.cumsum(dim=-1))[:, :-1]], dim=-1)
        in_nucleus = (before < goal) & valid
        in_nucleus[:, 0] = True
        last_in = in_nucleus.sum(dim=-1, keepdim=True) - 1
        threshold = values.gather(-1, last_in).squeeze(-1)
        # count_nonzero, not sum: a bool sum first copies [N, V] to int64.
        inside = x >= threshold.unsqueeze(-1)
        keep = inside
        if self.min_p is not None:
            min_p = self.min_p if rows is None else self.min_p[rows]
            keep = inside & (probs >= min_p * probs.amax(dim=-1, keepdim=True))
        kept = keep.count_nonzero(dim=-1)
        small = kept <= _MAX_CANDIDATE_DRAW
        big = (~small).nonzero().squeeze(-1)
        if big.numel() == x.shape[0]:
            yield _Stage(rows, threshold, kept, self)
        elif big.numel():
            yield _Stage(big if rows is None else rows[big], threshold[big], kept[big], self)
        small = small.nonzero().squeeze(-1)
        if small.numel():
            # Few enough to draw from candidates, as a row settled by a topk would be.
            again = small if rows is None else rows[small]
            width = int(inside.count_nonzero(dim=-1)[small].max()) + 1
            stage, failed, _ = self._stage(again, min(width, self.vocab))
            if stage is not None:
                yield stage
            if failed is not None:  # only through float64 rounding at the bin's edge
                last, _, _ = self._stage(again[failed], self.vocab)
                if last is not None:
                    yield last

    def _tune(self, stage: _Stage | None, failed: torch.Tensor | None) -> None:
        """Widen after a step where many rows needed a retry; narrow when all fit easily."""
        num_failed = 0 if failed is None else failed.numel()
        if num_failed * 16 > self.logits.shape[0]:
            self.next_width = min(self.next_width * 2, _MAX_TOP_P_WIDTH)
        elif (num_failed == 0 and stage is not None
              and _kept_width(stage.keep) * 8 <= self.next_width):
            self.next_width = max(self.next_width // 2, _MIN_TOP_P_WIDTH)


def truncated_stages(logits: torch.Tensor, probs: torch.Tensor, top_k: torch.Tensor | None,
                      max_top_k: int, top_p: torch.Tensor | None, min_p: torch.Tensor | None,
                      top_p_width: int) -> _TruncatedStages:
    return _TruncatedStages(logits, probs, top_k, max_top_k, top_p, min_p, top_p_width)


def _keep_candidates(values: torch.Tensor, probs: torch.Tensor, top_k: torch.Tensor | None,
                     top_p: torch.Tensor | None, min_p: torch.Tensor | None, vocab: int,
                     complete: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens kept by top-k, then top-p, then min-p, among each row's top-K candidates.

    values [N, K] descending with their probs [N, K]. Returns keep [N, K]; the threshold
    [N], the smallest logit top-k and top-p keep; ok [N], true where the row's kept set
    provably lies within its candidates; and need [N], a lower bound on the candidates a
    row that is not ok needs (K where no bound is known).
    """
    neg_inf = float("-inf")
    num_rows, width = values.shape
    last = values[:, -1]
    # A -inf candidate means every finite logit is among the candidates.
    ok = torch.full((num_rows,), complete, dtype=torch.bool, device=values.device)
    ok |= last == neg_inf
    # A row cut by neither top-k nor top-p keeps its whole vocabulary.
    cut = torch.zeros_like(ok)
    fits = torch.ones_like(ok)
    threshold = torch.full_like(last, neg_inf)
    need = torch.full((num_rows,), width, dtype=torch.long, device=values.device)
    if top_k is not None:
        active = top_k < vocab
        kth = values.gather(-1, (top_k.clamp(max=width) - 1).unsqueeze(-1)).squeeze(-1)
        threshold = kth.masked_fill(~active, neg_inf)
        # Tokens tied with the k-th could sit past the candidates unless the last is lower.
        fits &= ~active | (last < threshold) | (threshold == neg_inf)
        cut |= active
        need = torch.where(active, torch.maximum(need, top_k + 1), need)
    if top_p is not None:
        mass = probs.double().masked_fill(values < threshold.unsqueeze(-1), 0.0)
        cum = mass.cumsum(dim=-1)
        # The nucleus is a share of the top-k set's mass; without top-k, of the whole
        # distribution, whose softmax mass is 1.
        total = torch.ones_like(cum[:, -1])
        if top_k is not None:
            total = torch.where(top_k < vocab, cum[:, -1], total)
        goal = top_p.double() * total
        before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
        # A token stays while the more likely tokens before it have not reached top_p.
        in_nucleus = before < goal.unsqueeze(-1)
        in_nucleus[:, 0] = True
        last_in = in_nucleus.sum(dim=-1, keepdim=True) - 1
        cutoff = values.gather(-1, last_in).squeeze(-1)
        enabled = top_p < 1.0
        threshold = torch.where(enabled, torch.maximum(threshold, cutoff), threshold)
        fits &= ~enabled | (last < threshold)
        cut |= enabled
        # No token past the candidates is likelier than the last one, so reaching the goal
        # takes at least (goal - mass so far) / (last probability) more of them.
        last_prob = probs[:, -1].double()
        short = torch.where(last_prob > 0, (goal - cum[:, -1]) / last_prob, float(vocab))
        short = short.clamp(min=0, max=vocab)
        need = torch.where(enabled, torch.maximum(need, width + short.ceil().long()), need)
    keep = values >= threshold.unsqueeze(-1)
    if min_p is not None:
        keep &= probs >= min_p * probs[:, :1]
    return keep, threshold, ok | (fits & cut), need

def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens less likely than min_p times the row's top probability."""
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)
