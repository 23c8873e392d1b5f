"""The run configuration and the readers every entry point shares: `run.py` (the run config's
sections, typed and range-checked), `values.py` (typed reading of a mapping), `problems.py`
(ConfigError: every problem of a file, each with its key path), `files.py` (plain-YAML reading,
paths relative to the file), `arguments.py` (checked command-line numbers)."""

from .files import RESOURCES, read_yaml, resolve_path
from .problems import ConfigError, ConfigFileNotFoundError
from .run import ClientConfig, FederationSettings, RunConfig, load_run_config, parse_run_config

__all__ = ["RESOURCES", "ClientConfig", "ConfigError", "ConfigFileNotFoundError", "FederationSettings", "RunConfig",
           "load_run_config", "parse_run_config", "read_yaml", "resolve_path"]
