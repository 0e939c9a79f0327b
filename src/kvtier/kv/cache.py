"""The paged KV cache as the model sees it: write the new K/V, attend over a step's batch, wherever
the blocks live.

Blocks are spread over storage targets (memory tiers). Targets kept in the same memory share one
storage (``make_storages``), a *part*: ``prepare`` turns a step's block tables (logical ids) into
per-part slot tables once, and every layer then writes each new token into its block's part and runs
decode attention once per part, merging the partial results by log-sum-exp. With one part (a CPU-only
machine's device and host tiers) that is the plain cache's own arithmetic, so lossless policies give
the plain engine's tokens bit for bit; across parts (a disk tier) the merge is exact up to rounding.
A GPU engine with blocks off the GPU instead fetches them and attends over whole tables
(``kv/fetch.py``), the plain arithmetic again. A step's flat batch puts decode tokens first (one per
sequence), then prefill chunks, each attending to its sequence's cached prefix plus itself, causally.
When asked, decode attention also reports the attention mass of every block.

The storages own their format (``KVStorage``: float K/V; ``HackStorage``: HACK codes), so this class
never looks at bytes: it routes rows and plans to parts, passing each sequence's tail slot along.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvtier.kernels.attention import DecodePlan, gathered_decode_attention, merge_attention, prefill_attention
from kvtier.kv.fetch import DecodeFetch, plan_fetch
from kvtier.kv.placement import BlockPlacement, Move
from kvtier.kv.storage import KVStorage


@dataclass(slots=True)
class PartWrite:
    part: int
    rows: torch.Tensor | None  # rows of the flat batch going to this part (None: all of them)
    slots: torch.Tensor  # [n] slot of each row's block in the part
    offsets: torch.Tensor  # [n] position in the block
    tails: torch.Tensor  # [n] tail slot of each row's sequence (HACK's open-block V)
    copies: dict = field(default_factory=dict)  # slots, offsets, tails on another device, made once a step

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device == self.slots.device:
            return self.slots, self.offsets, self.tails
        if device not in self.copies:
            self.copies[device] = (self.slots.to(device), self.offsets.to(device), self.tails.to(device))
        return self.copies[device]


@dataclass(slots=True)
class PartDecode:
    part: int
    plan: DecodePlan  # slot tables [B, W_t] and token counts [B] of the blocks in this part
    blocks: np.ndarray  # [B, W_t] logical ids of those blocks (-1: padding)
    tails: torch.Tensor  # [B] tail slot of each sequence
    num_tokens: int  # cached tokens attention reads here (the plan's token counts, summed on the host)
    copies: dict = field(default_factory=dict)  # plan and tails on another device, made once a step

    def on(self, device: torch.device) -> tuple[DecodePlan, torch.Tensor]:
        if device not in self.copies:
            plan = DecodePlan(self.plan.block_tables.to(device), self.plan.context_lens.to(device))
            self.copies[device] = (plan, self.tails.to(device))
        return self.copies[device]


@dataclass(slots=True)
class PrefillSpan:
    start_token: int  # first token of the chunk in the flat batch
    num_tokens: int
    start_pos: int  # tokens of this sequence already in the cache
    tail: int = 0  # the sequence's tail slot
    blocks: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # with a cached prefix: where the blocks of prefix and chunk are, (part, slots, table positions)


@dataclass(slots=True)
class AttentionMetadata:
    writes: list[PartWrite]
    num_decode: int = 0
    decodes: list[PartDecode] = field(default_factory=list)
    fetch: DecodeFetch | None = None  # set where decode attention runs on fetched copies (fetch_decode)
    prefills: list[PrefillSpan] = field(default_factory=list)
    observe: bool = False  # accumulate each block's attention mass


@dataclass(slots=True)
class StepObservation:
    """Attention mass per logical block, summed over layers, KV heads and query heads, plus the
    per-layer, per-KV-head detail when a trace is recorded."""

    mass: torch.Tensor  # [num_blocks] float32
    layers: list | None = None  # per layer: list of (blocks [B, W_t], mass [B, Hkv, W_t]) per part


class TieredKVCache:
    def __init__(self, storages: list[KVStorage], placement: BlockPlacement, policy, scale: float,
                 block_size: int, device: torch.device):
        self.storages = storages  # one per target (moves, new blocks)
        self.parts = list({id(s.whole): s.whole for s in storages}.values())  # what K/V is written to and read from
        self.part_of = np.asarray([self.parts.index(s.whole) for s in storages], dtype=np.int64)  # [targets]
        self.base_of = np.asarray([s.base for s in storages], dtype=np.int64)  # [targets] first slot in the part
        self.placement = placement
        self.policy = policy
        self.scale = scale
        self.block_size = block_size
        self.device = device
        self.obs: StepObservation | None = None
        self.trace_layers = False
        self.tokens_read: dict[int, int] = {}  # this step: cached tokens attention reads, per target
        self.v_rows_read = 0  # this step, KCache: V rows read (per layer and KV head)
        # A GPU engine with float blocks off the GPU fetches them for decode attention rather than attending
        # where they are: the plain cache's arithmetic on the same values, so lossless policies stay exact
        # (the simulator's `fetch` offload). A policy with its own attention (KCache) reads in place.
        self.fetch_decode = device.type == "cuda" and storages[0].layout.fmt is None and not hasattr(
            policy, "decode_attention") and any(s.target_device != device for s in storages)

    # ---- step planning ----------------------------------------------------------------------------
    def prepare(self, decodes: list[tuple[list[int], int]], prefills: list[tuple[list[int], int, int]],
                observe: bool = False, tails: list[int] | None = None) -> AttentionMetadata:
        """``decodes``: (block table, tokens after this step) per decode sequence; ``prefills``:
        (block table, tokens already cached, chunk length) per prefill chunk, in flat batch order;
        ``tails``: the tail slot of each of those sequences, in the same order (default 0, 1, ...)."""
        tails = list(range(len(decodes) + len(prefills))) if tails is None else tails
        blocks, offsets, row_tails = self._token_blocks(decodes, prefills, tails)
        meta = AttentionMetadata(self._writes(blocks, offsets, row_tails), len(decodes), observe=observe)
        self.tokens_read, self.v_rows_read = {}, 0
        if decodes and self.fetch_decode:
            pl = self.placement
            meta.fetch = plan_fetch(self._table(decodes), [c for _, c in decodes], pl.target_of, pl.slot_of,
                                    self.storages, self.block_size, self.device)
            for t, n in meta.fetch.tokens.items():
                self._count(t, n)
            meta.fetch.start(0, self.storages)  # layer 0's copies overlap the embedding
        elif decodes:
            meta.decodes = self._decode_plans(decodes, tails[: len(decodes)])
        start = len(decodes)
        for (table, cached, n), tail in zip(prefills, tails[len(decodes):], strict=True):
            span_blocks = self._blocks_of(table, cached + n) if cached else []
            meta.prefills.append(PrefillSpan(start, n, cached, tail, span_blocks))
            start += n
        if observe:
            self.obs = StepObservation(torch.zeros(len(self.placement.target_of), device=self.device),
                                       [] if self.trace_layers else None)
        return meta

    def _count(self, target: int, tokens: int) -> None:
        self.tokens_read[target] = self.tokens_read.get(target, 0) + tokens

    def _where(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Target, part and slot in that part of each logical block (any shape)."""
        tgt = self.placement.target_of[blocks]
        return tgt, self.part_of[tgt], self.base_of[tgt] + self.placement.slot_of[blocks]

    def _token_blocks(self, decodes, prefills, tails) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row of the flat batch: its block, its position in the block, its sequence's tail slot."""
        bs = self.block_size
        blocks = [table[(ctx - 1) // bs] for table, ctx in decodes]
        pos = [ctx - 1 for _, ctx in decodes]
        row_tails = list(tails[: len(decodes)])
        for (table, cached, n), tail in zip(prefills, tails[len(decodes):], strict=True):
            blocks += [table[p // bs] for p in range(cached, cached + n)]
            pos += range(cached, cached + n)
            row_tails += [tail] * n
        as_array = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        return as_array(blocks), as_array(pos) % bs, as_array(row_tails)

    def _writes(self, blocks: np.ndarray, offsets: np.ndarray, tails: np.ndarray) -> list[PartWrite]:
        """One write per part; with a HACK cache one per run of rows in the same part, in batch order:
        a sequence's open-block V passes through its tail, so its tokens must arrive in order."""
        _, parts, slots = self._where(blocks)
        if len(self.parts) == 1:
            return [PartWrite(0, None, self._t(slots), self._t(offsets), self._t(tails))]
        if self.storages[0].layout.fmt is None:
            groups = [np.nonzero(parts == p)[0] for p in np.unique(parts)]
        else:
            cuts = np.flatnonzero(np.diff(parts)) + 1
            groups = np.split(np.arange(len(parts)), cuts)
        out = []
        for rows in groups:
            whole = len(rows) == len(blocks)
            out.append(PartWrite(int(parts[rows[0]]), None if whole else self._t(rows), self._t(slots[rows]),
                                   self._t(offsets[rows]), self._t(tails[rows])))
        return out

    @staticmethod
    def _table(decodes) -> np.ndarray:  # [B, W] the decodes' block tables, -1 padded
        width = max(len(t) for t, _ in decodes)
        table = np.full((len(decodes), width), -1, dtype=np.int64)
        for i, (t, _) in enumerate(decodes):
            table[i, : len(t)] = t
        return table

    def _decode_plans(self, decodes, tails: list[int]) -> list[PartDecode]:
        table = self._table(decodes)
        valid = table >= 0
        ctx = np.asarray([c for _, c in decodes], dtype=np.int64)
        tgt, part, slots = self._where(np.maximum(table, 0))
        slots = np.where(valid, slots, 0)
        if len(self.storages) == 1:
            self._count(0, int(ctx.sum()))
        else:
            for t, tokens in self._tokens_by(np.where(valid, tgt, -1), ctx).items():
                self._count(t, int(tokens.sum()))
        if len(self.parts) == 1:  # one part (the plain cache, or targets in one memory): the tables themselves
            return [PartDecode(0, DecodePlan(self._t(slots), self._t(ctx)), table, self._t(tails), int(ctx.sum()))]
        owner = np.where(valid, part, -1)
        plans = []
        for p, tokens in self._tokens_by(owner, ctx).items():
            mine = owner == p
            count = mine.sum(1)
            order = np.argsort(~mine, axis=1, kind="stable")[:, : count.max()]  # this part's blocks, in order
            ids = np.take_along_axis(table, order, 1)
            ids[np.arange(ids.shape[1])[None, :] >= count[:, None]] = -1
            mine_slots = np.where(ids >= 0, np.take_along_axis(slots, order, 1), 0)
            plans.append(PartDecode(p, DecodePlan(self._t(mine_slots), self._t(tokens)), ids, self._t(tails),
                                      int(tokens.sum())))
        return plans

    def _tokens_by(self, owner: np.ndarray, ctx: np.ndarray) -> dict[int, np.ndarray]:
        """Per owner (a target or a part) in ``owner`` [B, W] (-1: padding): each sequence's cached tokens
        in that owner's blocks [B] (the last block holds only the context's rest)."""
        bs = self.block_size
        last = owner[np.arange(len(ctx)), (ctx - 1) // bs]
        unwritten = bs - ((ctx - 1) % bs + 1)
        return {int(o): (owner == o).sum(1) * bs - np.where(last == o, unwritten, 0)
                for o in np.unique(owner[owner >= 0])}

    def _blocks_of(self, table: list[int], tokens: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(part, slots, table positions) of a sequence's first ``tokens`` tokens' blocks; counts the reads."""
        ids = np.asarray(table[: -(-tokens // self.block_size)], dtype=np.int64)
        tgt, part, slots = self._where(ids)
        for t in np.unique(tgt):
            self._count(int(t), int((tgt == t).sum()) * self.block_size)
        return [(int(p), self._t(slots[part == p]), self._t(np.nonzero(part == p)[0])) for p in np.unique(part)]

    def _t(self, a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)

    # ---- the layers' view ---------------------------------------------------------------------
    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        kv_dtype = self.storages[0].layout.dtype
        if meta.prefills or k.dtype not in (kv_dtype, torch.float32):
            k, v = k.to(kv_dtype), v.to(kv_dtype)  # prefill attends to K/V as the cache holds them (rounded)
        for w in meta.writes:
            storage = self.parts[w.part]
            dev = storage.target_device
            kk, vv = (k, v) if w.rows is None else (k[w.rows], v[w.rows])
            if dev != self.device:
                kk, vv = kk.to(dev), vv.to(dev)
            storage.write(layer, kk, vv, *w.on(dev))
        nd = meta.num_decode
        if nd and not meta.prefills:
            return self._decode(layer, q, k, v, meta)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(layer, q[:nd], k[:nd], v[:nd], meta)
        for span in meta.prefills:
            s, e = span.start_token, span.start_token + span.num_tokens
            if span.start_pos == 0:
                kk, vv = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
            else:
                kk, vv = self._gather_prefix(layer, span)
            out[s:e] = prefill_attention(q[s:e], kk.to(q.dtype), vv.to(q.dtype), self.scale)
        return out

    def _decode(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:  # [B, Hq, D]; k_new, v_new [B, Hkv, D]: the new tokens
        if meta.fetch is not None:
            out, lse, *blse = self._decode_fetched(layer, q, k_new, v_new, meta.fetch, meta.observe)
            pieces = [(meta.fetch.blocks, blse[0] if blse else None)]
        else:
            parts = [self._decode_part(layer, q, d, meta.observe) for d in meta.decodes]
            out, lse = (parts[0][0], parts[0][1]) if len(parts) == 1 else merge_attention([p[:2] for p in parts])
            pieces = [(d.blocks, p[2]) for d, p in zip(meta.decodes, parts, strict=True)]
        if meta.observe:
            self._observe(lse, pieces)
        return out

    def _decode_fetched(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                        f: DecodeFetch, observe: bool) -> tuple:
        """(out, lse (, block lse)) over whole tables, every block read copied to q's device in table order."""
        k, v = f.take(layer, self.storages, k_new, v_new)
        if layer + 1 < self.storages[0].layout.num_layers:
            f.start(layer + 1, self.storages)  # the next layer's copies run during this layer's compute
        return gathered_decode_attention(q, k.to(q.dtype), v.to(q.dtype), f.invalid, self.scale,
                                         self.block_size if observe else None)

    def _decode_part(self, layer: int, q: torch.Tensor, d: PartDecode, observe: bool) -> tuple:
        """(out, lse, block_lse or None) over one part's blocks, computed where the K lives (off q's
        device only where the cache does not fetch: CPU attention, NEO-style), returned on q's device."""
        storage = self.parts[d.part]
        dev = storage.target_device
        here = dev == q.device
        qd, (plan, tails) = (q, (d.plan, d.tails)) if here else (q.to(dev), d.on(dev))
        special = getattr(self.policy, "decode_attention", None)
        res = special(layer, qd, *storage.layer(layer), plan, self.scale) if special else None
        if res is not None:  # a policy's own attention (KCache)
            self.v_rows_read += int((res.selected >= 0).sum())
            res = (res.out, res.lse, None)
        else:
            res = storage.decode(layer, qd, plan, self.scale, tails, observe)
        if not here:
            res = [r if r is None else r.to(q.device) for r in res]
        return tuple(res)

    def _observe(self, lse: torch.Tensor, pieces: list[tuple[np.ndarray, torch.Tensor | None]]) -> None:
        """``pieces``: (logical ids [B, W_t], block lse [B, Hq, W_t] or None) per part attention ran over."""
        obs, detail = self.obs, []
        hkv = self.storages[0].layout.num_kv_heads
        for blocks, blse in pieces:
            if blse is None:
                continue
            b, hq, w = blse.shape
            mass = torch.exp(blse - lse[..., None]).view(b, hkv, hq // hkv, w).sum(2)  # [B, Hkv, W_t]
            ids = torch.as_tensor(blocks, device=mass.device)
            keep = ids >= 0
            obs.mass.index_add_(0, ids[keep], mass.sum(1)[keep])
            detail.append((blocks, mass))
        if obs.layers is not None:
            obs.layers.append(detail)

    def _gather_prefix(self, layer: int, span: PrefillSpan) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached prefix and the new chunk (already written) of one sequence: K, V [Hkv, start+n, D]."""
        total, bs = span.start_pos + span.num_tokens, self.block_size
        last = -(-total // bs) - 1  # table position of the sequence's last block
        parts = []  # per part: (table positions [n], K [Hkv, tokens, D], V)
        for p, slots, pos in span.blocks:
            tokens = len(pos) * bs - ((last + 1) * bs - total if int(pos[-1]) == last else 0)
            k, v = self.parts[p].dense(layer, slots, tokens, span.tail)
            parts.append((pos, k.to(self.device), v.to(self.device)))
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        hkv, d = parts[0][1].shape[0], parts[0][1].shape[2]
        k = parts[0][1].new_zeros((hkv, (last + 1) * bs, d))
        v = torch.zeros_like(k)
        for pos, kt, vt in parts:  # scatter each part's blocks to their positions
            rows = (pos.to(self.device)[:, None] * bs + torch.arange(bs, device=self.device)).flatten()[: kt.shape[1]]
            k[:, rows], v[:, rows] = kt.to(k.dtype), vt.to(v.dtype)
        return k[:, :total], v[:, :total]

    # ---- block moves and new blocks -------------------------------------------------------------
    def move(self, moves: list[Move]) -> None:
        """Copy migrated blocks (all layers, K and V), batched per (source, destination) pair. Every
        source is read before any destination is written: a batch may demote a block out of the very
        slot that a promoted block then takes."""
        assert len({m.block for m in moves}) == len(moves), "a block moved twice in one batch"
        pairs: dict[tuple[int, int], list[Move]] = {}
        for m in moves:
            pairs.setdefault((m.src, m.dst), []).append(m)
        gathered = [(dst, ms, self.storages[src].gather(self._t([m.src_slot for m in ms])))
                    for (src, dst), ms in pairs.items()]
        for dst, ms, parts in gathered:
            self.storages[dst].scatter(self._t([m.dst_slot for m in ms]), *parts)

    def zero_new(self, blocks: list[int]) -> None:
        """Clear freshly allocated blocks so attention never reads stale bits past a context."""
        ids = np.asarray(blocks, dtype=np.int64)
        tgt, slots = self.placement.target_of[ids], self.placement.slot_of[ids]
        for t in np.unique(tgt):
            self.storages[int(t)].zero(self._t(slots[tgt == t]))

