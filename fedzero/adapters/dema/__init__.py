"""DeMA: a dense mixture of shared experts in a low-rank space, bridged by private projectors."""

from .blocks import global_blocks, shared_block
from .config import DeMAConfig
from .model import DeMAModel, inject_dema

__all__ = ["DeMAConfig", "DeMAModel", "global_blocks", "inject_dema", "shared_block"]
