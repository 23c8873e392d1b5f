"""`fedzero --version` and the one output setting (--log-level / -q): third-party noise filtered."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import fedzero
from fedzero.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import sys, warnings
from fedzero import logs
logs.configure(sys.argv[1])
warnings.warn("a third-party future change", FutureWarning)
import deepspeed                       # on a machine without CUDA: 'Setting accelerator to CPU ...'
print("progress", logs.progress_enabled())
"""


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedzero {fedzero.__version__}"
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"] == fedzero.__version__


def test_quiet_is_log_level_warning_and_the_default_is_info():
    parser = build_parser()
    assert parser.parse_args(["compare", "a", "b"]).log_level == "info"
    assert parser.parse_args(["-q", "compare", "a", "b"]).log_level == "warning"
    assert parser.parse_args(["--log-level", "debug", "compare", "a", "b"]).log_level == "debug"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "loud", "compare", "a", "b"])


def _probe(level: str) -> str:
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "DS_ACCELERATOR")}
    done = subprocess.run([sys.executable, "-c", PROBE, level], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_third_party_noise_is_filtered_unless_debug():
    import torch

    quiet, loud, silent = _probe("info"), _probe("debug"), _probe("warning")
    assert "FutureWarning" in loud and "FutureWarning" not in quiet
    if not torch.cuda.is_available():
        assert "Setting accelerator to CPU" in loud and "Setting accelerator to CPU" not in quiet
    assert "progress True" in quiet and "progress True" in loud and "progress False" in silent
    assert "FutureWarning" not in silent
