"""DeMA: a dense mixture of shared experts in a low-rank space, bridged by private projectors."""

from .config import DeMAConfig
from .model import DeMAModel, inject_dema, shared_block

__all__ = ["DeMAConfig", "DeMAModel", "inject_dema", "shared_block"]
