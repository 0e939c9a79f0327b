"""Scheduler behaviour: token budget, chunked prefill, admission limits, preemption by recompute."""

from kvtier.engine.scheduler import Scheduler, SchedulerConfig
from kvtier.engine.sequence import Sequence, Status
from kvtier.kv.block_manager import BlockManager
from kvtier.kv.block_pool import BlockPool
from kvtier.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, chunked=True):
    pool = BlockPool(num_blocks)
    return Scheduler(SchedulerConfig(max_seqs, budget, chunked), BlockManager(pool, block_size)), pool


def seq(i, prompt, max_tokens=4):
    return Sequence(i, str(i), [1] * prompt, SamplingParams(), max_tokens)


def run_step(sched):
    batch = sched.schedule()
    for s, n in batch.scheduled():
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(5)
            if s.num_output_tokens >= s.max_tokens:
                sched.finish(s, "length")
    return batch


def test_chunked_prefill_follows_the_token_budget():
    sched, _ = make(budget=32)
    s = seq(0, 100)
    sched.add(s)
    chunks = [run_step(sched).prefills[0][1] for _ in range(4)]
    assert chunks == [32, 32, 32, 4]
    assert s.num_output_tokens == 1


def test_without_chunking_a_long_prompt_waits_for_the_whole_budget():
    sched, _ = make(budget=32, chunked=False)
    sched.add(seq(0, 100))
    assert run_step(sched).is_empty


def test_decodes_run_before_new_prefills_and_max_num_seqs_holds():
    sched, _ = make(budget=8, max_seqs=2)
    for i in range(3):
        sched.add(seq(i, 6))
    b1 = run_step(sched)
    assert [n for _, n in b1.prefills] == [6, 2]
    b2 = run_step(sched)
    assert len(b2.decodes) == 1 and b2.prefills[0][1] == 4
    assert len(sched.running) == 2 and len(sched.waiting) == 1


def test_preemption_by_recompute_loses_nothing():
    sched, pool = make(num_blocks=5, block_size=4, budget=64)
    a, b = seq(0, 6, max_tokens=8), seq(1, 6, max_tokens=8)
    sched.add(a)
    sched.add(b)
    preempted = []
    for _ in range(100):
        if not sched.has_unfinished():
            break
        preempted += run_step(sched).preempted
    assert preempted, "a pool of 20 tokens cannot hold two sequences of 14"
    assert b in preempted  # the newest sequence goes first
    assert a.is_finished and b.is_finished and a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert b.stats.num_preemptions >= 1 and a.stats.num_preemptions == 0
    assert pool.num_free == 5


def test_abort_frees_blocks_at_once():
    sched, pool = make()
    s = seq(0, 10)
    sched.add(s)
    run_step(sched)
    assert pool.num_used == 3
    sched.finish(s, "abort")
    assert pool.num_free == pool.num_blocks and s.status is Status.FINISHED and not sched.has_unfinished()
