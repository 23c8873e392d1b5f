"""`fedzero bench`: the benchmark harness of issues 5 and 6.

Modules: `backbones` (the testbed: SmolLM2-135M, healed depth variants, a small LLaMA of another
width, cached as local HF directories), `data` (tweets split by topic: per-client train, per-topic
test, own / unseen / global views), `methods` (one federation run per method: DeMA local/FedAvg/CMGA,
LoRA local/FedIT/HetLoRA/FLoRA/FlexLoRA), `suites` (quick and full), `report` (tables and plots),
`comm_table` (LLaMA-2 communication from configs), `peakmem` (peak RSS per method, one process
each), `runner` (run_bench: all of it, resumable). See docs/benchmarks.md.
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
