"""The federation store: on-disk layout for rounds, shared by simulator, clients and aggregator.

See docs/store.md for the layout and its guarantees. Modules: ``layout`` (every path and name),
``manifest`` (the typed manifests, their one parser and validator), ``artifact`` (tensor file
first, manifest last; read and verify), ``atomic`` (durable writes), ``store`` (the
``FederationStore`` facade), ``screen`` (checking client updates, the quarantine) and ``errors``.
"""

from .atomic import (
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    sha256_bytes,
    sha256_file,
)
from .errors import (
    StoreConflictError,
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
    StoreTimeoutError,
)
from .layout import STORE_FORMAT, STORE_VERSION, round_dirname, validate_client_id
from .screen import GlobalSpec, Rejection, UpdateRejected, quarantine, quarantined, scan_updates, screen_round
from .store import FederationStore, GlobalWait

__all__ = [
    "FederationStore",
    "GlobalWait",
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
    "GlobalSpec",
    "Rejection",
    "UpdateRejected",
    "scan_updates",
    "screen_round",
    "quarantine",
    "quarantined",
]
