"""Block pool and scheduler invariants under random add / step / finish / preempt sequences."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvtier.engine.scheduler import Scheduler, SchedulerConfig
from kvtier.engine.sequence import Sequence, Status
from kvtier.kv.block_manager import BlockManager
from kvtier.kv.block_pool import BlockPool
from kvtier.kv.manager import KVManager
from kvtier.kv.setup import plan_kv
from kvtier.kv.tiers import TierBudget
from kvtier.sampling_params import SamplingParams


def check_invariants(sched: Scheduler, pool: BlockPool, seqs: list[Sequence], placement=None) -> None:
    pool.check()
    if placement is not None:
        placement.check()
        placed = sum(placement.num_used(t) for t in range(len(placement.targets)))
        assert placed == pool.num_used, "a used block has no slot, or a free block still holds one"
    owners: dict[int, int] = {}
    for s in seqs:
        for b in s.block_table:
            assert b not in owners, f"block {b} owned by sequences {owners[b]} and {s.seq_id}"
            owners[b] = s.seq_id
        if s.status is Status.SWAPPED:
            assert s.block_table and all(placement.target_of[b] == 1 for b in s.block_table), \
                "a swapped sequence's blocks are not all in the host target"
        elif s.status is not Status.RUNNING:
            assert not s.block_table, "a finished or waiting sequence still holds blocks"
            assert s.status is Status.FINISHED or s.num_computed_tokens == 0
        else:
            assert len(s.block_table) * sched.bm.block_size >= s.num_computed_tokens
    used = {b for b, c in enumerate(pool.ref_counts) if c > 0}
    assert used == set(owners), "a block is held by nobody (leak) or owned without a reference"
    assert all(pool.ref_counts[b] == 1 for b in owners)


def fake_step(sched: Scheduler) -> None:
    """What the engine does after the model runs: tokens enter the cache, finished prefills sample."""
    batch = sched.schedule()
    if sched.bm.kv is not None:  # the engine's order: migrations after scheduling, before the model
        sched.bm.kv.before_step([s.block_table for s, _ in batch.scheduled()])
        sched.bm.kv.take_moves()
    for seq, n in batch.scheduled():
        seq.num_computed_tokens += n
        assert seq.num_computed_tokens <= seq.num_tokens
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq, "length")


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 60), st.integers(1, 20)),
        st.tuples(st.just("step"), st.just(0), st.just(0)),
        st.tuples(st.just("finish"), st.integers(0, 1000), st.just(0)),
        st.tuples(st.just("preempt"), st.integers(0, 1000), st.just(0)),
    ),
    max_size=80,
)


def block_manager(policy: str, num_blocks: int, block_size: int):
    """The pool, block manager and placement of a policy whose device tier holds ``num_blocks``
    (tiered ones get as many again in the host tier)."""
    if policy == "plain":
        pool = BlockPool(num_blocks)
        return pool, BlockManager(pool, block_size), None
    tiers = {"device": f"{num_blocks}blocks", "host": f"{num_blocks}blocks"}
    plan = plan_kv(policy, {}, tiers, TierBudget("device", blocks=num_blocks), 1, 1, 1, block_size)
    pool, placement = BlockPool(plan.num_blocks), plan.placement()
    return pool, BlockManager(pool, block_size, KVManager(plan.policy, placement)), placement


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(8, 40), block_size=st.sampled_from([1, 4, 16]),
       budget=st.integers(1, 64), max_seqs=st.integers(1, 8), policy=st.sampled_from(["plain", "swap", "dynamic"]))
@example(ops=[("add", 8, 14)] + [("step", 0, 0)] * 5 + [("add", 1, 1)] + [("step", 0, 0)] * 3 + [("add", 57, 5)]
         + [("step", 0, 0)] * 3 + [("add", 56, 2), ("add", 1, 1), ("finish", 384, 0), ("add", 41, 1)],
         num_blocks=24, block_size=4, budget=35, max_seqs=4, policy="dynamic")  # dynamic with every tier full
def test_pool_invariants_under_random_operations(ops, num_blocks, block_size, budget, max_seqs, policy):
    pool, bm, placement = block_manager(policy, num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), bm)
    capacity = num_blocks * block_size
    seqs: list[Sequence] = []
    for op, a, b in ops:
        if op == "add":
            prompt = min(a, capacity - 1)
            max_tokens = max(1, min(b, capacity - prompt))
            seq = Sequence(len(seqs), str(len(seqs)), [1] * prompt, SamplingParams(), max_tokens)
            seqs.append(seq)
            sched.add(seq)
        elif op == "step":
            fake_step(sched)
        elif op == "finish" and seqs:
            seq = seqs[a % len(seqs)]
            if not seq.is_finished:
                sched.finish(seq, "abort")
        elif op == "preempt" and sched.running:
            sched.preempt(sched.running[a % len(sched.running)])
        check_invariants(sched, pool, seqs, placement)
    for _ in range(100_000):  # every request completes: nothing is lost
        if not sched.has_unfinished():
            break
        fake_step(sched)
        check_invariants(sched, pool, seqs, placement)
    assert not sched.has_unfinished()
    assert all(s.is_finished for s in seqs)
    assert pool.num_free == pool.num_blocks, "blocks leaked after every request finished"


def test_share_and_free_refcounts():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.share(ids)
    pool.free(ids)
    assert pool.num_free == 2
    pool.free(ids)
    assert pool.num_free == 4
    pool.check()


def test_reused_blocks_come_out_in_their_old_order():
    pool = BlockPool(8)
    a = pool.allocate(5)
    assert a == [0, 1, 2, 3, 4]
    pool.free(a[1:])
    assert pool.allocate(4) == [1, 2, 3, 4]  # a finished sequence's table, still ascending
