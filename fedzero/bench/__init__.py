"""`fedzero bench`: suites of federated runs that compare the methods on one testbed, and their reports.

Modules: `runner` (run_bench: all of it, resumable), `suites` (the named suites and load_suite; their
definitions in `suites_report`, `suites_hetero`, `suites_conflict`; the checks in `suite_checks`),
`methods/` (one federation run per method: typed method specs, DeMA local/FedAvg/CMGA/distillation
and LoRA local/FedIT/HetLoRA/FLoRA/FlexLoRA runners), `data` (tweets split by topic: per-client
train, per-topic test, own / unseen / global views), `lm_corpus`, `lm_data`, `lm_score` (the LM
task: the fortunes corpus, its per-client split, held-out NLL), `stats` (stored outcomes,
classification and LM metrics, the prior-only control), `bootstrap` (paired bootstrap intervals),
`report/` (numbers, tables and plots), `comm_table` (LLaMA-2 communication from configs), `peakmem`
(peak RSS per method, one process each). The testbed's backbones are built by
fedzero.backbones.recipes. See docs/benchmarks.md.
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
