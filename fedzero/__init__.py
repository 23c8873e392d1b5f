"""fedzero: federated fine-tuning of large heterogeneous LMs with DeMA adapters and CMGA.

DeMA and CMGA here are *our design after the HeteroTune abstract* (arXiv 2411.16796), not the
paper's exact equations; see docs/method.md.
"""

__version__ = "0.1.0"
