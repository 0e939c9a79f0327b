"""Turn ``kvtier profile``'s measurements into a hardware file (the schema of ``schema.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kvtier.sim import profile as m
from kvtier.sim.hardware import from_raw, local_path
from kvtier.sim.model_shape import model_shape

REFERENCE_SHAPE = (2048, 2048)  # weight [out, in] of the matmul curves


def default_path() -> Path:
    return local_path()


def _q(value, source: str) -> dict:
    return {"value": value, "source": source}


def _measured(what: str) -> str:
    return f"measured by kvtier profile on {m.today()}: {what}"


def _tier(mem: dict[str, float], capacity: int, what: str) -> dict:
    return {
        "capacity": _q(f"{capacity / 2**30:.1f} GiB", f"{what}: total memory reported by the system"),
        "read_bandwidth": _q(m.rate_text(mem["read"], "B/s"), _measured(f"{what}, streaming sum of a large buffer")),
        "write_bandwidth": _q(m.rate_text(mem["write"], "B/s"), _measured(f"{what}, fill of a large buffer")),
        "copy_bandwidth": _q(m.rate_text(mem["copy"], "B/s"), _measured(f"{what}, copy, bytes read + written")),
    }


def layer_shapes(model) -> list[tuple[int, int]]:
    """[out, in] of one layer's linears, in the order a forward pass runs them: qkv, o, gate_up, down."""
    h, q, kv, i = model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
    return list(dict.fromkeys([(q + 2 * kv, h), (h, q), (2 * i, h), (h, i)]))


def _curve_entry(shape, rows, rates, ring_bytes: int, opts: m.ProfileOptions, what: str) -> dict:
    return {"rows": rows, "flops": [m.rate_text(r, "FLOP/s") for r in rates], "shape": list(shape),
            "source": _measured(f"kvtier Linear, {what} (ring of at least {ring_bytes >> 20} MiB, cold), "
                                f"{m._STATISTIC[0]} of {opts.repeats}")}


def _curves(opts: m.ProfileOptions, device: torch.device, ring_bytes: int, fixed) -> dict:
    rows = m.QUICK_ROWS if opts.quick else m.ROWS
    model = opts.model or model_shape("default")
    layer = [(512, 512)] if opts.quick else layer_shapes(model)
    alone = [] if opts.quick else [(model.vocab_size, model.hidden_size), REFERENCE_SHAPE]
    out = {}
    for name in opts.dtypes:
        dtype = m.TORCH_DTYPES[name]
        opts.say(f"matmul {name}: {len(layer)} layer shapes interleaved, {len(alone)} alone, {len(rows)} row counts")
        curves = m.matmul_curves(dtype, device, rows, opts.repeats, layer, ring_bytes, 2.0, fixed)
        out[name] = [_curve_entry(s, *curves[s], ring_bytes, opts, "interleaved as in a layer")
                     for s in layer]
        for shape in alone:
            rs, rates = m.matmul_curve(dtype, device, rows, opts.repeats, shape, ring_bytes, 0.5, fixed)
            out[name].append(_curve_entry(shape, rs, rates, ring_bytes, opts, "one shape"))
    return out


def _attention(opts: m.ProfileOptions, device: torch.device, op_s: float) -> dict:
    model = opts.model or model_shape("default")
    heads = f"{model.num_heads} query / {model.num_kv_heads} KV heads of {model.head_dim}"
    opts.say(f"attention kernels ({heads})")
    main_dtype = m.TORCH_DTYPES[opts.dtypes[0]]
    bw, per_seq, per_call = m.decode_attention(model, main_dtype, opts.quick, opts.repeats, op_s, device)
    out = {}
    if bw != float("inf"):
        fitted = _measured(f"paged decode attention, {heads}, fitted over batch x context")
        out["decode_bandwidth"] = _q(m.rate_text(bw, "B/s"), fitted)
        out["decode_per_sequence"] = _q(f"{per_seq * 1e6:.3f} us", fitted)
        out["decode_per_call"] = _q(f"{per_call * 1e6:.3f} us", fitted)
    causal, masked = {}, {}
    for name in opts.dtypes:
        lengths, rates, k = m.prefill_attention(model, m.TORCH_DTYPES[name], opts.quick, opts.repeats, op_s, device)
        causal[name] = {"lengths": lengths, "flops": [m.rate_text(r, "FLOP/s") for r in rates],
                        "source": _measured(f"causal prefill attention (torch SDPA) by chunk length, {heads}")}
        masked[name] = _q(m.rate_text(k, "FLOP/s"), _measured(f"prefill chunk after a cached prefix, {heads}"))
    out["prefill_curves"], out["prefill_masked_flops"] = causal, masked
    return out


def _sampling(opts: m.ProfileOptions, device: torch.device) -> dict:
    vocab = (opts.model or model_shape("default")).vocab_size
    opts.say(f"sampler over {vocab} logits")
    cost = m.sampling_costs(vocab, device, opts.repeats)
    src = _measured(f"kvtier's sampler over 1 and 16 rows of {vocab} logits")
    return {"call": _q(f"{cost['call'] * 1e6:.2f} us", src + ", per call"),
            "greedy": _q(f"{cost['greedy'] * 1e9:.4f} ns", src + ", greedy, per logit"),
            "random": _q(f"{cost['random'] * 1e9:.4f} ns", src + ", temperature 1 on top of greedy, per logit")}


def op_overhead(device: torch.device, repeats: int) -> float:
    """Seconds of one tiny fused op (RMSNorm of one row): the fixed cost every op pays."""
    from kvtier.kernels import ops

    x, w = torch.randn(1, 64, device=device), torch.ones(64, device=device)
    calls = 200
    return m.best_of(lambda: [ops.rms_norm(x, w, 1e-5) for _ in range(calls)], repeats, m._sync(device)) / calls


def _processor(opts: m.ProfileOptions, device: torch.device, ring_bytes: int) -> dict:
    op_s = op_overhead(device, opts.repeats)
    one_row, more_rows = m.matmul_call_overhead(device, opts.repeats)
    call_s = max(more_rows - one_row, 0.0)
    gpu = device.type == "cuda"
    proc = {
        "kind": "gpu" if gpu else "cpu",
        "model": torch.cuda.get_device_name(device) if gpu else m.cpu_name(),
        "isa": "cuda" if gpu else torch.backends.cpu.get_cpu_capability().lower(),
        "memory": "device",
        "efficiency": {k: _q(1.0, "measured rates are achieved rates") for k in ("memory", "matmul")},
        "overheads": {"op": _q(f"{op_s * 1e6:.2f} us", _measured("one-row RMSNorm, mean of 200 calls")),
                      "matmul_call": _q(f"{call_s * 1e6:.2f} us", _measured(
                          "a 64x64 Linear at 2-8 rows (packed GEMM) minus at one row (GEMV)"))},
        "matmul_curves": _curves(opts, device, ring_bytes, lambda rows: op_s + (call_s if rows > 1 else 0.0)),
        "attention": _attention(opts, device, op_s),
        "sampling": _sampling(opts, device),
    }
    if not gpu:
        proc["cores"] = _q(os.cpu_count() or 1, "os.cpu_count() on this machine")
        proc["threads"] = _q(torch.get_num_threads(), "torch.get_num_threads() during the profile")
    return proc


def _fit_overheads(raw: dict, opts: m.ProfileOptions) -> None:
    opts.say("engine overheads (tiny-llama steps)")
    fit = m.engine_overheads(raw, opts.dtypes[0], 2 if opts.quick else opts.repeats)
    ov = raw["processors"]["device"]["overheads"]
    src = _measured("residual of tiny-llama engine steps (2 and 8 layers, batch 1, 4, 16) over the cost model")
    ov["op"] = _q(f"{fit['op'] * 1e6:.2f} us", src)
    ov["step"] = _q(f"{fit['step'] * 1e6:.1f} us", src)
    ov["sequence"] = _q(f"{fit['sequence'] * 1e6:.2f} us", src)
    if opts.quick:
        return
    opts.say(f"linears in situ ({opts.model_name} decode steps, random weights)")
    eff = m.matmul_in_situ(raw, opts.model_name, opts.dtypes[0], opts.repeats)
    raw["processors"]["device"]["efficiency"]["matmul"] = _q(round(eff, 3), _measured(
        f"matmul curves' time for the linears over their time in {opts.model_name} decode steps "
        "(batch 1 and 8, random weights)"))


def _host_parts(raw: dict, opts: m.ProfileOptions, device: torch.device) -> None:
    """On a GPU machine: the CPU and its memory as the host, and the PCIe link."""
    mib = 256 if opts.quick else 1024
    opts.say("host memory and host<->device copies")
    raw["processors"]["cpu"] = {"kind": "cpu", "model": m.cpu_name(), "memory": "host",
                                "cores": _q(os.cpu_count() or 1, "os.cpu_count() on this machine")}
    raw["memory"]["host"] = _tier(m.memory_bandwidth(torch.device("cpu"), mib, opts.repeats),
                                  m.total_memory_bytes(), "host DRAM")
    link = m.host_device_copies(device, mib, opts.repeats)
    tiny = m.best_of(lambda: torch.empty(1024, device=device).copy_(torch.ones(1024)), opts.repeats, m._sync(device))
    raw["links"] = {"pcie": {
        "ends": ["host", "device"],
        "forward": _q(m.rate_text(link["h2d"], "B/s"), _measured(f"pinned host-to-device copy of {mib} MiB")),
        "backward": _q(m.rate_text(link["d2h"], "B/s"), _measured(f"pinned device-to-host copy of {mib} MiB")),
        "both_directions": _q(m.rate_text(link["both"], "B/s"), _measured("both directions at once, sum")),
        "latency": _q(f"{tiny * 1e6:.1f} us", _measured("a 4 KiB host-to-device copy")),
    }}


def profile_machine(opts: m.ProfileOptions, name: str = "local") -> dict:
    """Measure this machine; return the hardware file as a dict (validated by the schema)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    ring = 3 * (torch.cuda.get_device_properties(device).L2_cache_size if gpu else m.llc_bytes())
    opts.say(f"memory bandwidth on {device.type}")
    mem = m.memory_bandwidth(device, 256 if opts.quick else 1024, opts.repeats)
    capacity = torch.cuda.get_device_properties(device).total_memory if gpu else m.total_memory_bytes()
    raw = {
        "schema_version": 1, "name": name,
        "description": f"this machine ({m.cpu_name()}{', ' + torch.cuda.get_device_name(device) if gpu else ''}), "
                       f"measured by kvtier profile on {m.today()} with {torch.get_num_threads()} threads"
                       + (", timed in CPU time" if m.cpu_clock_on() else ""),
        "role": "machine",
        "processors": {"device": _processor(opts, device, ring)},
        "memory": {"device": _tier(mem, capacity, "GPU memory" if gpu else "DRAM")},
    }
    if gpu:
        _host_parts(raw, opts, device)
    _fit_overheads(raw, opts)
    from_raw(raw, "kvtier profile")  # the file must load: fail here rather than in simulate
    return raw


def to_yaml(raw: dict) -> str:
    """YAML with each quantity ``{value, source}`` and each list of numbers on one line."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def mapping(d, data):
        flow = set(data) <= {"value", "source", "note"}
        return d.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)

    def sequence(d, data):
        flow = all(not isinstance(x, (dict, list)) for x in data)
        return d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(dict, mapping)
    Dumper.add_representer(list, sequence)
    return yaml.dump(raw, Dumper=Dumper, sort_keys=False, width=100_000, allow_unicode=True)


def write_hardware_file(raw: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `kvtier profile`; every number has its source. Schema: docs/simulator.md\n"
    path.write_text(header + to_yaml(raw))
    return path
