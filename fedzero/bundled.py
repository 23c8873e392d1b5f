"""Files the commands need beside the Python package: the launch scripts (launch/), the DeepSpeed
configs (ds_configs/) and the example run configs (configs/).

In a source checkout they are the checkout's own directories. A wheel (`pip install .`) carries
copies under fedzero/_bundled/ (setup.py's build step writes them), so `fedzero federate`, `fedzero
submit` and `fedzero simulate --config fedzero:configs/demo.yaml` work from an installed package too.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent
BUNDLED = PACKAGE / "_bundled"
BUNDLED_DIRS = ("launch", "ds_configs", "configs")     # what setup.py copies into a wheel


def bundled_path(relative: str | Path) -> Path:
    """`launch/client.py`, `ds_configs/zero3.json`, `configs/demo.yaml`, ...: the checkout's file
    if this package runs from a source checkout, else the wheel's copy."""
    relative = Path(relative)
    if relative.parts and relative.parts[0] not in BUNDLED_DIRS:
        raise ValueError(f"{relative}: not under one of the bundled directories {BUNDLED_DIRS}")
    for base in (CHECKOUT, BUNDLED):
        path = base / relative
        if path.exists():
            return path
    raise FileNotFoundError(f"{relative} is neither in a source checkout ({CHECKOUT}) nor bundled with this "
                            f"installation ({BUNDLED}); reinstall fedzero (pip install .)")
