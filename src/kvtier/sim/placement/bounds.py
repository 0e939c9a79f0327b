"""Bounds on the time T of any placement: the unlimited-HBM ceiling and the LP relaxation (HiGHS).

Both are bounds on the same ``Problem`` and cost model as the policies (``model.py``); neither
returns a schedule.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from kvtier.sim.errors import WorkloadError
from kvtier.sim.placement.model import Problem, Result

US = 1e6  # the LP works in microseconds: coefficients near 1 suit HiGHS's absolute tolerances


def unlimited(p: Problem) -> Result:
    """Unlimited HBM: with the full KV in HBM *and* off-package (the paper's off-package memory holds
    it all), every decode step reads the best split of its KV from both, with no capacity limit and
    no migration.

    A lower bound on T for every schedule, hence a ceiling on throughput: a schedule's step time is
    ``max(h, e) >= lam * h + (1 - lam) * e`` for any ``lam`` in [0, 1], and for a fixed ``lam`` the
    best split puts each unit where ``lam * ch`` or ``(1 - lam) * ce`` is smaller. The maximum over
    ``lam`` (evaluated on a grid that contains the read and write breakpoints) is that bound; it
    equals the best fractional split by LP duality when the grid holds the maximizer.
    """
    c = p.coef
    lam_r = (1 / p.machine.ext_read) / (1 / p.machine.hbm_read + 1 / p.machine.ext_read)
    lam_w = (1 / p.machine.ext_write) / (1 / p.machine.hbm_write + 1 / p.machine.ext_write)
    best = np.zeros(c.ch.shape[:2])  # [N, G] seconds per decode step
    for lam in np.unique(np.concatenate([np.linspace(0.0, 1.0, 65), [lam_r, lam_w]])):
        best = np.maximum(best, lam * c.h0 + np.minimum(lam * c.ch, (1 - lam) * c.ce).sum(axis=2))
    k = p.trace.steps.astype(np.float64)
    seconds = float((k * best.sum(axis=1)).sum() + k.sum() * c.head)
    return Result(seconds, p.decode_tokens / seconds, 0.0, 0.0)


class _Index:
    """Column numbers of one window's LP variables (-1: not a variable)."""

    def __init__(self, live: np.ndarray, linked: np.ndarray):
        n, g, _ = live.shape  # live, linked: [n, G, U] bool
        self.x = np.full(live.shape, -1)
        self.x[live] = np.arange(live.sum())
        self.num_x, self.num_moves = int(live.sum()), int(linked.sum())
        self.up = np.full(live.shape, -1)
        self.up[linked] = self.num_x + np.arange(self.num_moves)  # dn is up + num_moves
        self.t = self.num_x + 2 * self.num_moves + np.arange(n * g).reshape(n, g)
        self.size = self.num_x + 2 * self.num_moves + n * g


def _rows(p: Problem, ix: _Index, a: int, b: int) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Rows t >= k h + h_mig, t >= k e + e_mig per step and group, then capacity per step."""
    c, k = p.coef, p.trace.steps[a:b].astype(np.float64)
    n, g = ix.t.shape
    nn, gg, uu = np.nonzero(ix.x >= 0)
    mn, mg, mu = np.nonzero(ix.up >= 0)
    mb, up = c.mig_bytes[a + mn, mu], ix.up[mn, mg, mu]
    r, cl, v = [], [], []
    for side, (coef, m_in, m_out) in enumerate([(c.ch, c.in_h, c.out_h), (-c.ce, c.in_e, c.out_e)]):
        base = side * n * g
        r += [base + nn * g + gg, base + np.arange(n * g), base + mn * g + mg, base + mn * g + mg]
        cl += [ix.x[nn, gg, uu], ix.t.ravel(), up, up + ix.num_moves]
        v += [US * k[nn] * coef[a + nn, gg, uu], -np.ones(n * g), US * m_in * mb, US * m_out * mb]
    r.append(2 * n * g + nn)
    cl.append(ix.x[nn, gg, uu])
    v.append(np.ones(len(nn)))
    rhs = np.concatenate([np.repeat(-US * k * c.h0, g), (-US * k[:, None] * c.ce[a:b].sum(axis=2)).ravel(),
                          np.full(n, float(p.slots))])
    rows = sparse.csr_matrix((np.concatenate(v), (np.concatenate(r), np.concatenate(cl))), shape=(len(rhs), ix.size))
    return rows, rhs


def _continuity(ix: _Index) -> sparse.csr_matrix:
    """x[n] - x[n-1] - up[n] + dn[n] = 0 for units that held bytes before step n."""
    mn, mg, mu = np.nonzero(ix.up >= 0)
    up, rows = ix.up[mn, mg, mu], np.arange(ix.num_moves)
    cl = np.concatenate([ix.x[mn, mg, mu], ix.x[mn - 1, mg, mu], up, up + ix.num_moves])
    v = np.repeat([1.0, -1.0, -1.0, 1.0], ix.num_moves)
    return sparse.csr_matrix((v, (np.tile(rows, 4), cl)), shape=(ix.num_moves, ix.size))


def _window_lp(p: Problem, a: int, b: int) -> float:
    """The LP's minimum over steps a..b-1 (seconds, LM head aside) with a free placement at step a."""
    c = p.coef
    active = ((c.ch[a:b] > 0) | (c.ce[a:b] > 0)).any(axis=0)  # [G, U] read or written in the window
    live = p.trace.exists()[a:b, None, :] & active[None]  # [n, G, U]
    linked = live & (c.mig_bytes[a:b, None, :] > 0)
    linked[0] = False  # the window starts free
    ix = _Index(live, linked)
    a_ub, b_ub = _rows(p, ix, a, b)
    cost = np.zeros(ix.size)
    cost[ix.t.ravel()] = 1.0
    upper = np.full(ix.size, np.inf)
    upper[: ix.num_x] = 1.0
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=_continuity(ix), b_eq=np.zeros(ix.num_moves),
                  bounds=np.stack([np.zeros(ix.size), upper], axis=1), method="highs")
    if res.status != 0:
        raise WorkloadError(f"the LP bound did not solve: {res.message}",
                            "use a coarser problem (--unit-tokens, --step-stride, --layer-groups)")
    return float(res.fun) / US


def lp_bound(p: Problem, window: int | None = None, progress=None) -> Result:
    """The LP relaxation of the placement problem, solved with HiGHS: a lower bound on T.

    Variables: ``x[n, g, u]`` in [0, 1] (the share of unit u of group g in HBM during step n),
    ``up, dn >= 0`` with ``x[n] - x[n-1] = up - dn`` (moved in and out before step n), and per step
    and group ``t >= k h + h_mig``, ``t >= k e + e_mig``, all linear in them (``model.py``);
    ``sum_{g,u} x[n] <= slots``; minimize ``sum t``.

    Proof that it bounds every schedule: take any schedule ``X`` the cost model accepts (binary,
    units that exist, at most ``slots`` per step) and set ``x = X``, ``up = max(0, X[n] - X[n-1])``,
    ``dn = max(0, X[n-1] - X[n])`` and ``t`` to the maximum. Every constraint holds and the objective
    equals ``evaluate(X)`` term by term (the same coefficients), so the LP's minimum, over a set that
    contains every schedule, is at most any schedule's T: relaxing ``X`` to [0, 1] only enlarges the
    set. Two reductions keep it small, and both only lower the minimum or leave it unchanged:

    - ``window``: the steps are cut into windows of ``window`` steps, each solved on its own with a
      free placement at its first step, and the minima added. A schedule's T is the sum of its
      windows' costs, and restricted to a window it is feasible for that window's LP minus the
      migration into the window's first step (dropped, never negative): so the sum of the minima is
      at most T. ``None``: one window.
    - units a window neither reads nor writes are held at 0 there: given any feasible point, setting
      such a unit to 0 for the whole window keeps it feasible (less capacity used) and removes only
      its migration terms (its read and write coefficients are 0), so the minimum is unchanged.

    The unit, layer-group and step resolution is the problem's own (every policy is evaluated on
    the same problem). HiGHS solves each window to its default tolerances (1e-7 of a microsecond per
    row), far below the digits reported.
    """
    n = len(p.trace.steps)
    cuts = list(range(0, n, window or n)) + [n]
    total = 0.0
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        total += _window_lp(p, a, b)
        if progress:
            progress()
    seconds = total + float(p.trace.steps.sum()) * p.coef.head
    return Result(seconds, p.decode_tokens / seconds, 0.0, 0.0)
