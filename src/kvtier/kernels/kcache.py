"""KCache decode attention (arXiv 2404.18057): all of K, only the top-N rows of V.

Per sequence and KV head: ``s = q.K^T * scale`` over every cached key, ``p = softmax(s)`` per query
head, the ``N`` keys with the largest ``p`` summed over the ``G = Hq / Hkv`` query heads of that KV
head are kept, and ``o = sum_{i kept} p_i V_i``. Selection is per KV head so that each selected V
row is read once for its whole query group; V is read at the selected rows only (it may live in
slow memory), never over the whole context. Options:

- ``top_n``: an int is an absolute count, a float in (0, 1] a fraction of the context (rounded up);
  either way at least 1 and at most the context.
- ``renormalize``: divide by the kept probability mass (attention over the kept set) or not (the
  paper's ``sum p_i V_i`` with p normalized over all keys; which one the paper uses is unverified).
- Layer exemption is a policy switch, not a kernel option: :meth:`KCacheOptions.applies_to` tells
  a policy whether a layer uses KCache; exempt layers call dense ``paged_decode_attention``.

Returns ``(out, lse, selected)``: ``lse`` is the log of what ``out`` was divided by (the kept mass's
log-sum-exp with ``renormalize``, all keys' otherwise), so ``out * exp(lse)`` is the unnormalized
sum over the kept rows and results merge across tiers by log-sum-exp like the float kernel's.
``selected [B, Hkv, N]`` holds the kept token positions in ascending order, ``-1`` past a
sequence's own count (sequences of a batch may keep different counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvtier.errors import ConfigError
from kvtier.kernels import ext
from kvtier.kernels.attention import DecodePlan

_MODULE = "kcache"


def _fast(t: torch.Tensor):
    return ext.load(_MODULE) if t.device.type == "cpu" else None


@dataclass(frozen=True, slots=True)
class KCacheOptions:
    top_n: int | float = 0.1  # absolute count, or a fraction of the context in (0, 1]
    renormalize: bool = True
    exempt_layers: tuple[int, ...] = ()  # layers that keep dense attention

    def __post_init__(self):
        check_top_n(self.top_n)

    def applies_to(self, layer: int) -> bool:
        return layer not in self.exempt_layers


def check_top_n(top_n: int | float) -> None:
    if isinstance(top_n, bool) or not isinstance(top_n, (int, float)):
        raise ConfigError(f"KCache top_n must be a number, got {top_n!r}",
                          "give a count (e.g. 256) or a fraction of the context (e.g. 0.1)")
    if isinstance(top_n, int) and top_n < 1:
        raise ConfigError(f"KCache top_n={top_n} keeps no token", "use a count >= 1 or a fraction in (0, 1]")
    if isinstance(top_n, float) and not 0.0 < top_n <= 1.0:
        raise ConfigError(f"KCache top_n={top_n} is not a fraction in (0, 1]",
                          "use a fraction such as 0.1, or an int for an absolute count")


def selected_counts(context_lens: torch.Tensor, top_n: int | float) -> torch.Tensor:
    """Rows kept per sequence [B]: min(N, ctx) for a count, ceil(N * ctx) for a fraction (>= 1)."""
    check_top_n(top_n)
    if isinstance(top_n, int):
        return context_lens.clamp(max=top_n)
    n = torch.ceil(context_lens.double() * top_n - 1e-9).long()  # 0.1 * 510 = 51.000000000000007 -> 51
    return torch.minimum(n.clamp(min=1), context_lens)


class KCacheOutput(NamedTuple):
    out: torch.Tensor  # [B, Hq, D] in q's dtype
    lse: torch.Tensor  # [B, Hq] float32: log of the normalizer out was divided by
    selected: torch.Tensor  # [B, Hkv, N] int64 token positions, ascending, -1 padded


def kcache_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [NB, Hkv, bs, D]
    v_cache: torch.Tensor,  # [NB, Hkv, bs, D], read only at the selected rows
    plan: DecodePlan,
    scale: float,
    top_n: int | float,
    renormalize: bool = True,
) -> KCacheOutput:
    counts = selected_counts(plan.context_lens, top_n)
    fast = _fast(q)
    if fast is not None and k_cache.is_contiguous() and v_cache.is_contiguous():
        return KCacheOutput(*fast.kcache_decode_attention(q, k_cache, v_cache, plan.block_tables, plan.context_lens,
                                                          counts, scale, renormalize))
    return kcache_decode_attention_reference(q, k_cache, v_cache, plan, scale, counts, renormalize)


def kcache_decode_attention_reference(q, k_cache, v_cache, plan: DecodePlan, scale: float, counts: torch.Tensor,
                                      renormalize: bool = True) -> KCacheOutput:
    b, hq, d = q.shape
    nb, hkv, bs, _ = k_cache.shape
    gather, invalid = plan.reference_index(hkv, bs)
    t = gather.shape[-1] * bs
    k = k_cache.reshape(nb * hkv, bs, d)[gather].view(b, hkv, t, d)
    s = torch.matmul(q.reshape(b, hkv, hq // hkv, d).float(), k.float().transpose(-1, -2)).mul_(scale)
    s.masked_fill_(invalid, float("-inf"))  # [B, Hkv, G, T]
    lse = torch.logsumexp(s, -1)  # [B, Hkv, G]
    p = torch.exp(s - lse[..., None])
    selected = _top_rows(p.sum(2).masked_fill_(invalid[:, 0], -1.0), counts)  # [B, Hkv, N]
    kept = selected >= 0
    pos = torch.where(kept, selected, selected[..., :1])  # padding re-reads a selected row (weight 0)
    blocks = plan.block_tables.gather(1, (pos // bs).view(b, -1)).view_as(pos)
    heads = torch.arange(hkv, device=q.device)[None, :, None]
    dev = v_cache.device  # V may sit in slower memory than K: only the selected rows cross over
    v = v_cache[blocks.to(dev), heads.to(dev), (pos % bs).to(dev)].to(q.device).float()  # [B, Hkv, N, D]
    ps = torch.where(kept[:, :, None, :], p.gather(-1, pos[:, :, None, :].expand(-1, -1, hq // hkv, -1)), 0.0)
    out = ps @ v  # [B, Hkv, G, D]
    if renormalize:
        mass = ps.sum(-1)  # [B, Hkv, G]
        out = out / mass[..., None]
        lse = lse + torch.log(mass)
    return KCacheOutput(out.view(b, hq, d).to(q.dtype), lse.view(b, hq), selected)


def _top_rows(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Positions of the ``counts[b]`` largest scores [B, Hkv, T] (-1 = masked), ascending, -1 padded."""
    n_max = int(counts.max())
    top = torch.topk(score, n_max, dim=-1).indices  # [B, Hkv, N] by descending score
    past = score.shape[-1]  # sorts after every position, then becomes -1
    top = torch.where(torch.arange(n_max, device=score.device) < counts[:, None, None], top, past)
    top = top.sort(-1).values
    return torch.where(top < past, top, -1)
