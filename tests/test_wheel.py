"""A non-editable install (`pip install .`, a wheel) carries what the commands need: the launch
scripts, the DeepSpeed configs, the example configs (fedzero/_bundled/, setup.py) and the bundled
data (fedzero/resources/). The slow test installs the wheel into a fresh venv that sees this venv's
dependencies but not the checkout, and runs the demo and the cluster commands from it."""

import glob
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(out)], check=True)
    (found,) = glob.glob(str(out / "fedzero-*.whl"))
    return Path(found)


def test_the_wheel_carries_launch_scripts_ds_configs_configs_and_resources(wheel):
    from fedzero.bundled import BUNDLED_DIRS

    names = set(zipfile.ZipFile(wheel).namelist())
    for directory in BUNDLED_DIRS:            # every tracked file of the bundled directories
        tracked = subprocess.run(["git", "ls-files", directory], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
        assert tracked
        missing = [f for f in tracked if f"fedzero/_bundled/{f}" not in names]
        assert not missing, f"not in the wheel: {missing}"
    for needed in ("fedzero/_bundled/launch/client.py", "fedzero/_bundled/launch/aggregate.py",
                   "fedzero/_bundled/launch/slurm/client.sbatch", "fedzero/_bundled/ds_configs/zero3.json",
                   "fedzero/_bundled/configs/demo.yaml", "fedzero/resources/demo/airlines.train.jsonl",
                   "fedzero/resources/anchors/sotu.jsonl"):
        assert needed in names
    # the build step copies exactly the directories bundled_path looks in
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    (copied,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", None) == "BUNDLED_DIRS"]
    assert tuple(copied) == tuple(BUNDLED_DIRS)


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_prepare_and_a_slurm_dry_run(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # this venv's dependencies, as a plain path: its .pth files (the editable fedzero) are not run
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args):
        proc = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    where = run(str(python), "-c", "import fedzero, fedzero.bundled as b, fedzero.federate as f; "
                "print(fedzero.__file__); print(b.bundled_path('ds_configs/zero3.json')); print(f._launch_script('client.py'))")
    lines = where.split()
    assert all(line.startswith(str(site)) and "/_bundled/" in line for line in lines[1:]), where
    assert lines[0].startswith(str(site))

    fedzero = str(venv / "bin" / "fedzero")
    out = run(fedzero, "-q", "simulate", "--config", "fedzero:configs/demo.yaml", "--rounds", "1", "--out", "demo")
    assert "strategy cmga, 1 rounds" in out and (work / "demo" / "summary.json").is_file()
    out = run(fedzero, "prepare", "--config", "fedzero:configs/demo.yaml", "--out", "fed")
    assert (work / "fed" / "clients" / "airlines" / "client.yaml").is_file()
    assert f"{site}/fedzero/_bundled/ds_configs/zero3.json" in (work / "fed" / "clients" / "airlines" / "client.yaml").read_text()
    out = run(fedzero, "submit", "--config", "fedzero:configs/demo.yaml", "--out", "fed", "--dry-run")
    assert f"export FEDZERO_LAUNCH={site}/fedzero/_bundled/launch" in out and out.count("$ sbatch") == 4
