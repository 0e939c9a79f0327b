"""Token selection: greedy rows by argmax; sampled rows through temperature, top-k, top-p and
min-p masks, then one draw each from the row's own generator (seeded requests reproduce), by
inverse CDF."""

from __future__ import annotations

import torch

from kvtier.sampling_params import SamplingParams


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # logits: [N, V] already divided by temperature; top_k: [N] (0 = off); top_p: [N]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    v = logits.shape[-1]
    ranks = torch.arange(v, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, v)[:, None]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # keep a token while the mass before it is < top_p
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


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
    sub = logits[rows]
    temp = torch.tensor([params[i].temperature for i in rows], device=logits.device)
    sub = sub / temp[:, None]
    top_k = torch.tensor([params[i].top_k for i in rows], device=logits.device)
    top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
    if bool((top_k > 0).any() or (top_p < 1).any()):
        sub = _mask_top_k_top_p(sub, top_k, top_p)
    probs = sub.softmax(dim=-1)
    min_p = torch.tensor([params[i].min_p for i in rows], device=logits.device)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    for i, token in zip(rows, draw(probs, [generators[i] for i in rows]).tolist(), strict=True):
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
