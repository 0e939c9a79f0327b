"""The time of one engine step on described hardware, as a timeline of streams.

Per layer, in the engine's order (``LlamaModel.forward``): the qkv linear, RoPE, the KV write,
attention (decode: bytes of KV read from each memory tier; prefill: FLOPs of each chunk), the o
linear, a residual RMSNorm, gate_up, SiLU-and-mul, down, a residual RMSNorm. Linears take the
roofline ``max(bytes / bandwidth, FLOPs / rate(rows))``, with ``rate`` from a measured curve
(``kvtier profile``) or peak x efficiency; every op pays a fixed dispatch overhead; the step pays
the engine's per-step and per-sequence overheads on the host.

KV blocks outside the compute tier are read in one of three ways (``offload``): ``fetch`` copies a
layer's blocks over the link ahead of its attention (``prefetch_depth`` layers ahead, so copies
overlap compute), ``direct`` reads them in place across the link (zero-copy, e.g. GH200 C2C), and
``cpu`` lets the host CPU attend over them at host memory bandwidth, in parallel with the device.
Migrations the KV policy plans (``Transfer``) are split evenly over layers and share the links.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.models.config import ModelConfig
from kvtier.sim.errors import CapacityError, HardwareError
from kvtier.sim.hardware import Hardware
from kvtier.sim.timeline import Timeline, shared_link_seconds
from kvtier.utils.units import format_bytes

DTYPE_BYTES = {"float32": 4, "tf32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}
OFFLOAD_MODES = ("fetch", "direct", "cpu")
DEVICE = "device"  # the stream of the processor that runs the model


@dataclass(frozen=True, slots=True)
class Transfer:
    src: str  # memory tier
    dst: str
    nbytes: float  # over all layers


@dataclass(slots=True)
class StepShape:
    """What one scheduled batch asks of the hardware (what ``LLMEngine`` logs per step)."""

    decode_context: list[int] = field(default_factory=list)  # tokens each decode attends to, new one included
    prefill_chunks: list[tuple[int, int]] = field(default_factory=list)  # (tokens already cached, chunk length)
    num_sampled: int | None = None  # rows through the LM head; None: every decode and every chunk
    random_rows: int = 0  # of those, rows sampled with temperature > 0 (the rest are greedy)
    new_blocks: int = 0  # blocks allocated this step (zeroed before the forward pass)
    decode_tokens_by_tier: dict[str, int] | None = None  # decode KV tokens per tier; None: all in the compute tier
    transfers: list[Transfer] = field(default_factory=list)  # migrations planned by the KV policy

    @property
    def num_tokens(self) -> int:
        return len(self.decode_context) + sum(n for _, n in self.prefill_chunks)

    @property
    def num_seqs(self) -> int:
        return len(self.decode_context) + len(self.prefill_chunks)

    @property
    def sampled(self) -> int:
        return self.num_seqs if self.num_sampled is None else self.num_sampled


@dataclass(slots=True)
class _LayerPlan:
    pre: list[tuple[str, float]]  # before attention
    attention: list[tuple[str, float]]  # attention over the compute tier and prefill chunks
    post: list[tuple[str, float]]  # after attention
    traffic: dict[tuple[str, str], float]  # (src, dst) -> bytes per layer over a link
    direct_s: float = 0.0  # zero-copy attention over remote tiers, on the device stream
    cpu_s: float = 0.0  # host-CPU attention over host-resident KV


class CostModel:
    def __init__(self, hw: Hardware, model: ModelConfig, dtype: str, block_size: int = 16,
                 offload: str = "fetch", prefetch_depth: int = 1):
        p = hw.processor("device")
        if dtype not in p.dtypes():
            raise HardwareError(f"hardware {hw.name} has no {dtype} compute",
                                f"use --dtype with one of: {', '.join(p.dtypes())}")
        if offload not in OFFLOAD_MODES:
            raise HardwareError(f"unknown offload mode '{offload}'", f"use one of: {', '.join(OFFLOAD_MODES)}")
        assert block_size >= 1 and prefetch_depth >= 1
        self.hw, self.model, self.dtype, self.p = hw, model, dtype, p
        self.block_size, self.offload, self.prefetch_depth = block_size, offload, prefetch_depth
        self.it = DTYPE_BYTES[dtype]
        self.tier = hw.tier(p.memory)
        self.mem_bw = self.tier.read_bw * p.efficiency["memory"]
        self.write_bw = self.tier.write_bw * p.efficiency["memory"]
        self.op = p.overheads["op"]
        self.decode_bw = (p.decode_bandwidth or self.tier.read_bw) * p.efficiency["attention_decode"]
        self.prefill_curve = p.prefill_curves.get(dtype)
        self.prefill_eff = p.efficiency["attention_prefill"]  # applies to measured rates too (1 in profiles)
        self.prefill_rate = self._peak() * self.prefill_eff  # without a measured curve
        masked = p.prefill_masked_flops.get(dtype)
        self.masked_rate = masked * self.prefill_eff if masked else (
            self.prefill_curve.flops[-1] * self.prefill_eff if self.prefill_curve else self.prefill_rate)
        self.kv_token_layer = 2 * model.kv_size * self.it  # K and V of one token in one layer
        self.weight_bytes = model.num_params() * self.it

    # ---- public ------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        return self.kv_token_layer * self.model.num_layers * self.block_size

    def step(self, s: StepShape, record: bool = False) -> Timeline:
        """The step's timeline; ``.makespan`` is its time in seconds."""
        self.check_capacity(s)
        tl = Timeline(record)
        ov = self.p.overheads
        host = tl.add("host", ov["step"] + ov["sequence"] * s.num_seqs, "engine overhead (host)")
        if s.new_blocks:
            tl.add(DEVICE, s.new_blocks * self.block_bytes / self.write_bw + self.op, "zero new blocks", host)
        t, h = s.num_tokens, self.model.hidden_size
        tl.add(DEVICE, self._mem(3 * t * h * self.it), "embed + norm", host)
        self._layers(tl, self._plan(s), host)
        self._head(tl, s)
        return tl

    def seconds(self, s: StepShape) -> float:
        return self.step(s).makespan

    def check_capacity(self, s: StepShape) -> None:
        """KV in use plus weights must fit each tier: overflow is an error, never a silent slowdown."""
        per_tier = dict(s.decode_tokens_by_tier or {self.p.memory: sum(s.decode_context)})
        per_tier[self.p.memory] = per_tier.get(self.p.memory, 0) + sum(a + n for a, n in s.prefill_chunks)
        for name, tokens in per_tier.items():
            tier = self.hw.tier(name)
            need = tokens * self.kv_token_layer * self.model.num_layers
            need += self.weight_bytes if name == self.p.memory else 0
            if need > tier.capacity:
                raise CapacityError(
                    f"the step needs {format_bytes(need)} in memory tier '{name}' of {self.hw.name} "
                    f"({'weights + ' if name == self.p.memory else ''}KV of {tokens} tokens) but it holds "
                    f"{format_bytes(tier.capacity)}", "use fewer or shorter sequences, another tier, or more memory")

    # ---- pieces ------------------------------------------------------------------------------
    def _peak(self) -> float:
        p = self.p
        if self.dtype in p.peak_flops:
            return p.peak_flops[self.dtype]
        return max(c.best_flops for c in p.curves[self.dtype])  # the best measured rate

    def _mem(self, nbytes: float) -> float:
        return nbytes / self.mem_bw + self.op

    def linear_seconds(self, rows: int, k: int, n: int) -> float:
        """``[rows, k] @ [k, n]``: the slower of streaming the weight and doing the FLOPs, plus dispatch (and
        the fixed cost of a multi-row matmul call, e.g. oneDNN's, where the hardware file gives one)."""
        if rows == 0:
            return 0.0
        elems = k * n
        t_mem = (elems + rows * (k + n)) * self.it / self.mem_bw
        curve = self.p.curve(self.dtype, n, k)
        if curve is not None:
            t_math = curve.seconds(rows, elems) / self.p.efficiency["matmul"]
        else:
            t_math = 2 * rows * elems / (self._peak() * self.p.efficiency["matmul"])
        return max(t_mem, t_math) + self.op + (self.p.overheads["matmul_call"] if rows > 1 else 0.0)

    def _plan(self, s: StepShape) -> _LayerPlan:
        m, t, it = self.model, s.num_tokens, self.it
        q, kv, h, i = m.q_size, m.kv_size, m.hidden_size, m.intermediate_size
        pre = [("qkv linear", self.linear_seconds(t, h, q + 2 * kv)),
               ("rope", self._mem(2 * t * (q + kv) * it)),
               ("kv write", self._mem(4 * t * kv * it))]
        post = [("o linear", self.linear_seconds(t, q, h)), ("add + rmsnorm", self._mem(4 * t * h * it)),
                ("gate_up linear", self.linear_seconds(t, h, 2 * i)), ("silu * up", self._mem(3 * t * i * it)),
                ("down linear", self.linear_seconds(t, i, h)), ("add + rmsnorm", self._mem(4 * t * h * it))]
        plan = _LayerPlan(pre, self._prefill_ops(s), post, {})
        self._decode_ops(s, plan)
        for tr in s.transfers:
            key = (tr.src, tr.dst)
            plan.traffic[key] = plan.traffic.get(key, 0.0) + tr.nbytes / m.num_layers
        return plan

    def _decode_ops(self, s: StepShape, plan: _LayerPlan) -> None:
        b = len(s.decode_context)
        if not b:
            return
        home = self.p.memory
        tiers = s.decode_tokens_by_tier or {home: sum(s.decode_context)}
        local = tiers.get(home, 0)
        for name, tokens in tiers.items():
            if name == home or not tokens:
                continue
            nbytes = tokens * self.kv_token_layer
            if self.offload == "fetch":
                plan.traffic[(name, home)] = plan.traffic.get((name, home), 0.0) + nbytes
                local += tokens
            elif self.offload == "direct":
                link = self.hw.link(name, home)
                rate = min(link.rate(name, home), self.hw.tier(name).read_bw)
                plan.direct_s += nbytes / rate + link.latency
            else:
                plan.cpu_s += self._cpu_attention(name, nbytes)
        nbytes = local * self.kv_token_layer + 2 * b * self.model.q_size * self.it
        fixed = self.op + self.p.decode_per_call
        plan.attention.insert(0, ("decode attention", nbytes / self.decode_bw + b * self.p.decode_per_sequence + fixed))

    def _cpu_attention(self, tier_name: str, nbytes: float) -> float:
        cpu = self.hw.processors.get("cpu")
        if cpu is None or cpu.memory != tier_name:
            raise HardwareError(f"offload mode cpu needs a host CPU next to tier '{tier_name}'",
                                "add a host with --host (e.g. ddr5-genoa) or use --offload fetch")
        link = self.hw.link(tier_name, self.p.memory)
        bw = self.hw.tier(tier_name).read_bw * cpu.efficiency["memory"]
        return nbytes / bw + 2 * link.latency  # queries over, partial outputs back

    def _prefill_ops(self, s: StepShape) -> list[tuple[str, float]]:
        m, it = self.model, self.it
        per_token = 4 * m.num_heads * m.head_dim  # QK^T and PV, 2 FLOPs per multiply-add
        ops = []
        for start, n in s.prefill_chunks:
            if start == 0:
                rate = self.prefill_curve.rate(n) * self.prefill_eff if self.prefill_curve else self.prefill_rate
                ops.append(("prefill attention", per_token * n * (n + 1) / 2 / rate + 2 * self.op))
                continue
            total = start + n
            gather = 4 * self._mem(2 * total * m.kv_size * it)  # K and V of the prefix, copied out twice each
            ops.append(("prefill attention", gather + per_token * n * total / self.masked_rate + 3 * self.op))
        return ops

    def _link_traffic(self, tl: Timeline, traffic: dict, after: float, layer: int) -> float:
        """Issue one layer's transfers; return when the last one into the compute tier ends."""
        done, seen = after, set()
        for (src, dst), nbytes in traffic.items():
            link = self.hw.link(src, dst)
            if link.name in seen:
                continue
            seen.add(link.name)
            back = traffic.get((dst, src), 0.0)
            t_fwd, t_back = shared_link_seconds(nbytes, link.rate(src, dst), back, link.rate(dst, src), link.both)
            for (a, b), secs, size in (((src, dst), t_fwd, nbytes), ((dst, src), t_back, back)):
                if size:
                    end = tl.add(link.stream(a, b), secs + link.latency, f"transfer {a}>{b}", after, layer)
                    done = max(done, end) if b == self.p.memory else done
        return done

    def _layers(self, tl: Timeline, plan: _LayerPlan, host: float) -> None:
        num, depth = self.model.num_layers, self.prefetch_depth
        ready = {}  # layer -> when its inbound KV has arrived
        if plan.traffic:
            for layer in range(min(depth, num)):
                ready[layer] = self._link_traffic(tl, plan.traffic, host, layer)
        for layer in range(num):
            start = tl.free[DEVICE]
            if plan.traffic and layer + depth < num:
                ready[layer + depth] = self._link_traffic(tl, plan.traffic, start, layer + depth)
            end = start
            for name, secs in plan.pre:
                end = tl.add(DEVICE, secs, name, layer=layer)
            cpu_end = tl.add("cpu", plan.cpu_s, "cpu attention", end, layer) if plan.cpu_s else 0.0
            for i, (name, secs) in enumerate(plan.attention):
                tl.add(DEVICE, secs, name, ready.get(layer, 0.0) if i == 0 else 0.0, layer)
            if plan.direct_s:
                tl.add(DEVICE, plan.direct_s, "attention over link (zero-copy)", layer=layer)
            for i, (name, secs) in enumerate(plan.post):
                tl.add(DEVICE, secs, name, cpu_end if i == 0 else 0.0, layer)

    def _head(self, tl: Timeline, s: StepShape) -> None:
        n, m = s.sampled, self.model
        if not n:
            return
        tl.add(DEVICE, self.linear_seconds(n, m.hidden_size, m.vocab_size), "lm head")
        tl.add(DEVICE, self.sampling_seconds(n, s.random_rows), "sampling")

    def sampling_seconds(self, rows: int, random_rows: int) -> float:
        """The engine's sampler: an argmax over every row's logits, then softmax and a draw per random row.
        Measured per logit where the hardware file says (``sampling``), else one pass over the float32
        logits for greedy and four plus one op per row for random."""
        assert 0 <= random_rows <= rows
        v, per = self.model.vocab_size, self.p.sampling
        greedy = per.get("call", 0.0) + rows * v * per["greedy"] if "greedy" in per else self._mem(rows * v * 4)
        if not random_rows:
            return greedy
        if "random" in per:
            return greedy + random_rows * v * per["random"]
        return greedy + self._mem(4 * random_rows * v * 4) + random_rows * self.op
