"""The KV placement study (arXiv 2508.13231): where should each KV entry live, HBM or off-package
memory, step by step, when both are read in parallel? See docs/placement.md.

- ``traces``: attention access traces as arrays (``AccessTrace``), the accessed set of a step;
- ``recorded``, ``synthetic``: a trace from kvtier's JSONL (scaled to a larger model and workload),
  or generated with a chosen sparsity and importance variation;
- ``model``: the reduced problem (``Problem``) and its cost model (``evaluate``);
- ``baselines``, ``annealing``, ``online``: placement policies (a schedule of HBM sets per step);
- ``bounds``: the unlimited-HBM ceiling and the LP relaxation (a true lower bound on time);
- ``study``: run them, normalize, sweep; ``plots``/``report``: figures and tables.
"""
