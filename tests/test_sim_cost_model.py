"""The step cost model's invariants: more bytes never faster, overlap bounded by its streams,
capacity overflow is an error."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.sim.cost_model import CostModel, StepShape, Transfer
from kvtier.sim.errors import CapacityError, HardwareError
from kvtier.sim.hardware import MatmulCurve, load_system
from kvtier.sim.model_shape import model_shape
from kvtier.sim.timeline import Timeline, shared_link_seconds

HW = load_system("h100-sxm", "ddr5-genoa")
LLAMA = model_shape("llama-3-8b")


def cost(offload="fetch", depth=1, hw=HW, model=LLAMA, dtype="bfloat16"):
    return CostModel(hw, model, dtype, 16, offload, depth)


def tiered(batch, ctx, host_share):
    host = int(batch * ctx * host_share)
    return StepShape([ctx] * batch, decode_tokens_by_tier={"device": batch * ctx - host, "host": host})


@pytest.mark.parametrize("offload", ["fetch", "direct", "cpu"])
def test_more_context_batch_or_offloaded_kv_is_never_faster(offload):
    cm = cost(offload)
    for share in (0.0, 0.5):
        times = [cm.seconds(tiered(8, c, share)) for c in (128, 512, 2048, 8192)]
        assert times == sorted(times)
        times = [cm.seconds(tiered(b, 1024, share)) for b in (1, 4, 16, 64)]
        assert times == sorted(times)
    shares = [cm.seconds(tiered(16, 4096, s)) for s in (0.0, 0.25, 0.5, 1.0)]
    if offload != "cpu":  # attention on the host CPU may beat the device's own: not a monotone knob
        assert shares == sorted(shares)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(0, 32), ctx=st.integers(1, 4096), extra=st.integers(1, 2048),
       chunk=st.integers(0, 2048), prefix=st.integers(0, 4096), new_blocks=st.integers(0, 64))
def test_adding_work_never_makes_a_step_faster(batch, ctx, extra, chunk, prefix, new_blocks):
    cm = cost()
    chunks = [(prefix, chunk)] if chunk else []
    base = StepShape([ctx] * batch, chunks, new_blocks=new_blocks)
    if base.num_tokens == 0:
        return
    t = cm.seconds(base)
    assert cm.seconds(StepShape([ctx + extra] * batch, chunks, new_blocks=new_blocks)) >= t
    assert cm.seconds(StepShape([ctx] * (batch + 1), chunks, new_blocks=new_blocks)) >= t
    assert cm.seconds(StepShape([ctx] * batch, chunks + [(0, extra)], new_blocks=new_blocks)) >= t
    assert cm.seconds(StepShape([ctx] * batch, chunks, new_blocks=new_blocks + 1)) >= t


@pytest.mark.parametrize("offload", ["fetch", "direct", "cpu"])
@pytest.mark.parametrize("share", [0.0, 0.3, 0.9])
def test_overlap_is_bounded_by_the_slowest_stream_and_the_serial_sum(offload, share):
    tl = cost(offload).step(tiered(32, 2048, share))
    busy = tl.busy.values()
    assert tl.makespan >= max(busy) - 1e-12
    assert tl.makespan <= sum(busy) + 1e-12
    if offload == "fetch" and share:
        assert tl.busy["pcie:host>device"] > 0 and tl.makespan < sum(busy)  # the copies overlapped some compute


def test_deeper_prefetch_is_never_slower():
    shape = tiered(16, 4096, 0.5)
    times = [cost(depth=d).seconds(shape) for d in (1, 2, 4, 32)]
    assert times == sorted(times, reverse=True)


def test_migrations_both_ways_contend_on_the_link():
    gb = 1e9
    both = StepShape([1024] * 4, transfers=[Transfer("host", "device", gb), Transfer("device", "host", gb)])
    one = StepShape([1024] * 4, transfers=[Transfer("host", "device", gb)])
    assert cost().seconds(both) > cost().seconds(one)


@given(b1=st.floats(0, 1e9), b2=st.floats(0, 1e9), r1=st.floats(1e9, 1e11), r2=st.floats(1e9, 1e11),
       both=st.one_of(st.none(), st.floats(1e9, 2e11)))
def test_shared_link_is_never_faster_than_each_direction_alone(b1, b2, r1, r2, both):
    t1, t2 = shared_link_seconds(b1, r1, b2, r2, both)
    assert t1 >= b1 / r1 * (1 - 1e-9) and t2 >= b2 / r2 * (1 - 1e-9)
    if both is not None and b1 and b2:
        assert max(t1, t2) >= (b1 + b2) / max(both, r1 + r2) * (1 - 1e-9)


def test_timeline_is_the_critical_path():
    tl = Timeline(record=True)
    a = tl.add("device", 2.0, "compute")
    b = tl.add("link", 5.0, "copy")
    tl.add("device", 1.0, "needs copy", after=b)
    assert tl.makespan == 6.0 and tl.stall["device"] == pytest.approx(3.0) and a == 2.0
    assert [s.name for s in tl.spans] == ["compute", "copy", "needs copy"]


def test_capacity_overflow_is_an_error_not_a_slowdown():
    with pytest.raises(CapacityError, match="tier 'device'"):
        cost().seconds(StepShape([8192] * 128))
    with pytest.raises(CapacityError, match="tier 'host'"):
        cost().seconds(StepShape([1024], decode_tokens_by_tier={"device": 0, "host": 10**9}))


def test_dtype_the_hardware_lacks_names_the_allowed_ones():
    with pytest.raises(HardwareError) as e:
        cost(hw=load_system("t4"), model=model_shape("llama-2-7b"))
    assert "no bfloat16" in str(e.value) and "float16" in str(e.value)


def test_cpu_offload_needs_a_host_cpu():
    with pytest.raises(HardwareError, match="--host"):
        cost("cpu", hw=load_system("h100-sxm")).seconds(tiered(4, 1024, 0.5))


def test_matmul_curve_more_rows_never_take_less_time():
    curve = MatmulCurve.from_flops([1, 8, 64, 512], [20e9, 200e9, 150e9, 400e9])  # noisy, non-monotone time
    times = [curve.seconds(r, 1e6) for r in range(1, 1200, 7)]
    assert times == sorted(times)


def test_faster_hardware_is_faster_and_decode_scales_with_context():
    slow, fast = load_system("a10g"), load_system("h200")
    shape = StepShape([1024] * 8)
    model = model_shape("llama-2-7b")
    assert CostModel(fast, model, "bfloat16").seconds(shape) < CostModel(slow, model, "bfloat16").seconds(shape)
    cm = CostModel(fast, model, "bfloat16")
    assert cm.seconds(StepShape([8192] * 16)) > 1.5 * cm.seconds(StepShape([512] * 16))
