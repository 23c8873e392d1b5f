"""`fedzero bench`: suites of federated runs that compare the methods on one testbed, and their reports.

Modules: `data` (tweets split by topic: per-client train, per-topic test, own / unseen / global views),
`lm_data` (the LM task's per-client fortunes domains), `methods` (one federation run per method: DeMA
local/FedAvg/CMGA/distillation, LoRA local/FedIT/HetLoRA/FLoRA/FlexLoRA), `suites` (the named suites
and the checks on a suite file), `stats` (classification and LM metrics, the prior-only control, the
paired bootstrap), `report/` (numbers, tables and plots), `comm_table` (LLaMA-2 communication from
configs), `peakmem` (peak RSS per method, one process each), `runner` (run_bench: all of it,
resumable). The testbed's backbones are built by fedzero.backbones.recipes. See docs/benchmarks.md.
"""

from __future__ import annotations


def run_bench(*args, **kwargs):
    """See fedzero.bench.runner.run_bench (imported lazily: it pulls in torch and transformers)."""
    import os
    import sys

    if "torch" not in sys.modules:
        # Idle OpenMP threads sleep instead of spinning: on cores shared with other processes,
        # spinning threads slowed 2-thread runs several-fold. Effective only before torch loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .runner import run_bench as _run

    return _run(*args, **kwargs)


__all__ = ["run_bench"]
