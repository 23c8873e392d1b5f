"""The federation store: on-disk layout for rounds, shared by simulator, clients and aggregator.

See docs/store.md for the layout and its guarantees.
"""

from .atomic import (
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    sha256_bytes,
    sha256_file,
)
from .store import (
    STORE_FORMAT,
    STORE_VERSION,
    FederationStore,
    StoreConflictError,
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
    StoreTimeoutError,
    round_dirname,
    validate_client_id,
)

__all__ = [
    "FederationStore",
    "StoreError",
    "StoreNotFoundError",
    "StoreIntegrityError",
    "StoreConflictError",
    "StoreTimeoutError",
    "STORE_FORMAT",
    "STORE_VERSION",
    "validate_client_id",
    "round_dirname",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_safetensors",
    "sha256_bytes",
    "sha256_file",
]
