"""The `fedzero` command's one output setting: `--log-level` (or `-q`).

    debug     everything third-party libraries say (their warnings, HF progress bars, DeepSpeed's notices)
    info      the default: fedzero's own output (progress bar, per-round lines, results); third-party
              noise filtered: FutureWarning / DeprecationWarning, UserWarnings raised inside torch,
              transformers, peft, deepspeed and huggingface_hub, transformers' and huggingface_hub's
              info/warning logs and loading bars, DeepSpeed's log below ERROR (its "Setting
              accelerator to CPU" notice)
    warning   as info, without progress bars (-q)
    error     as warning

Launched processes (`fedzero federate`'s clients and aggregator) inherit the same filtering through
`child_environment`. Errors are never filtered.
"""

from __future__ import annotations

import logging
import os
import warnings

LEVELS = ("debug", "info", "warning", "error")
DEFAULT = "info"
THIRD_PARTY = ("torch", "transformers", "peft", "deepspeed", "huggingface_hub", "accelerate", "tqdm")

_level = DEFAULT


def level() -> str:
    return _level


def progress_enabled() -> bool:
    """Whether fedzero shows progress bars (not at -q / warning and above)."""
    return LEVELS.index(_level) <= LEVELS.index("info")


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_DEEPSPEED_FILTER = _BelowError()


def configure(name: str = DEFAULT) -> None:
    """Apply a level to this process (before the third-party libraries are imported, where possible:
    the environment variables are read at their import; the rest also works after)."""
    global _level
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {LEVELS}, got {name!r}")
    _level = name
    deepspeed = logging.getLogger("DeepSpeed")       # DeepSpeed's own logger (deepspeed.utils.logging)
    if name == "debug":
        deepspeed.removeFilter(_DEEPSPEED_FILTER)
        return
    for key, value in child_environment(name).items():
        os.environ.setdefault(key, value)       # a user's own setting wins
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for module in THIRD_PARTY:
        warnings.filterwarnings("ignore", category=UserWarning, module=rf"{module}(\.|$)")
    deepspeed.addFilter(_DEEPSPEED_FILTER)           # a logger's filters survive DeepSpeed's set-up of it
    for logger in ("transformers", "huggingface_hub", "peft", "accelerate"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    _quiet_loaded_libraries()


def child_environment(name: str | None = None) -> dict[str, str]:
    """Environment variables that give a launched process the same filtering (empty for debug)."""
    if (name or _level) == "debug":
        return {}
    return {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def _quiet_loaded_libraries() -> None:
    """Libraries already imported read their environment variables too early: set them directly."""
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
