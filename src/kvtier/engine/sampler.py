"""Token selection: greedy rows by argmax; sampled rows through temperature, top-k, top-p and
min-p masks, then one draw each from the row's own generator (seeded requests reproduce), by
inverse CDF."""

from __future__ import annotations

import torch

from kvtier.sampling_params import SamplingParams

CANDIDATES = 1024  # top-k/top-p look at each row's top tokens first, not at a sort of the vocabulary


def _candidates(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k and top-p survivors of each row as (logits [N, W] with -inf where dropped, token ids [N, W]).

    logits: [N, V] already divided by temperature; top_k: [N] (0 = off); top_p: [N]. Each row's top
    CANDIDATES tokens (or its top_k) first; a row without top-k that keeps less than top_p of its mass
    within them is sorted whole, and a row that masks nothing keeps every token (then W = V). A token is
    kept while the mass before it is < top_p, the mass over the row's top-k set."""
    n, v = logits.shape
    k = torch.where(top_k > 0, top_k, v)  # [N]
    whole = logits.logsumexp(-1) if bool((k >= v).any()) else None  # [N], for the rows without top-k
    vals, ids, covered = _top(logits, k, top_p, min(v, max(CANDIDATES, int(top_k.max()))), whole)
    free = (k >= v) & (top_p >= 1)  # rows of a mixed batch that mask nothing: every token, unsorted
    if bool((covered & ~free).all()):
        return vals, ids
    all_vals = torch.full((n, v), float("-inf"), device=logits.device)
    all_ids = torch.zeros((n, v), dtype=ids.dtype, device=logits.device)
    done = covered & ~free
    all_vals[done, : vals.shape[1]], all_ids[done, : ids.shape[1]] = vals[done], ids[done]
    all_vals[free], all_ids[free] = logits[free], torch.arange(v, device=logits.device)
    rest = ~done & ~free
    if bool(rest.any()):
        all_vals[rest], all_ids[rest], _ = _top(logits[rest], k[rest], top_p[rest], v, whole[rest])
    return all_vals, all_ids


def _top(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, width: int, whole: torch.Tensor | None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_candidates`` within each row's top ``width`` tokens, and [N] whether that holds the row's cut.
    ``whole``: each row's log-sum-exp over all tokens (None: every row has a top-k)."""
    v = logits.shape[-1]
    vals, ids = logits.topk(width, dim=-1)  # [N, W] descending
    drop = torch.arange(width, device=logits.device)[None, :] >= k[:, None]
    if whole is None or not bool((k >= v).all()):  # the mass over each row's top-k set
        lse = vals.masked_fill(drop, float("-inf")).logsumexp(-1)
        whole = lse if whole is None else torch.where(k < v, lse, whole)
    probs = torch.exp(vals - whole[:, None]).masked_fill_(drop, 0.0)  # [N, W] over each row's top-k set
    mass_before = probs.double().cumsum(dim=-1) - probs  # summed in float64: a cut at 0.99 of a flat row
    covered = (k <= width) | (mass_before[:, -1] + probs[:, -1] >= top_p)
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return vals.masked_fill(drop, float("-inf")), ids, covered


def sample(
    logits: torch.Tensor,  # [N, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    greedy = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return greedy.tolist()
    out = greedy.tolist()
    column = lambda name: torch.tensor([getattr(params[i], name) for i in rows], device=logits.device)  # noqa: E731
    sub, ids = logits[rows] / column("temperature")[:, None], None
    top_k, top_p, min_p = column("top_k"), column("top_p"), column("min_p")
    if bool((top_k > 0).any() or (top_p < 1).any()):
        sub, ids = _candidates(sub, top_k, top_p)  # [N, W]
    probs = sub.softmax(dim=-1)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    tokens = draw(probs, [generators[i] for i in rows])
    if ids is not None:
        tokens = ids.gather(1, tokens[:, None]).squeeze(1)
    for i, token in zip(rows, tokens.tolist(), strict=True):
        out[i] = token
    return out


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``probs`` [N, V] (unnormalized, >= 0) by inverse CDF: a single uniform from each
    row's generator, so a seeded request draws the same tokens in any batch. ``torch.multinomial`` costs
    1-4 ms per 49K-token row on a CPU core; this is one cumsum and one binary search for all rows."""
    u = torch.stack([torch.rand((), generator=g, device=probs.device) for g in generators])  # [N]
    cdf = probs.cumsum(dim=-1)  # [N, V]
    total = cdf[:, -1:].contiguous()
    idx = torch.searchsorted(cdf, u[:, None] * total, right=True)  # first token whose cdf passes the draw
    last = torch.searchsorted(cdf, total, right=False)  # the last token with mass (u * total rounded up)
    return torch.minimum(idx, last).squeeze(1)
