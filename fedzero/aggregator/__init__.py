"""The MPI aggregator: one round of FedAvg/CMGA sharded over ranks (docs/aggregator.md).

    mpirun -np 4 python launch/aggregate.py --store STORE --round R --config RUN.yaml

Library entry point: `run_aggregation(store_root, round, strategy, quorum=, deadline_s=, comm=)`.
"""

from .config import AggregatorSettings, aggregator_settings, load_aggregator_settings
from .mpi import AggregationError, QuorumError
from .runner import Arrivals, run_aggregation, wait_for_updates
from .shards import Segment, TensorInfo, plan_shards

__all__ = ["AggregationError", "AggregatorSettings", "Arrivals", "QuorumError", "Segment", "TensorInfo",
           "aggregator_settings", "load_aggregator_settings", "plan_shards", "run_aggregation",
           "wait_for_updates"]
