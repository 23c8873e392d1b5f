"""The Slurm batch scripts, run against stand-ins for sbatch/srun/scontrol/deepspeed that record
what they are asked to do (there is no Slurm here)."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "launch" / "slurm"


def fake_tools(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("sbatch", "deepspeed", "python"):
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> {log}\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'node001\\nnode002\\n'\n")
    # srun runs its command once per node, as SLURM_NODEID 0 and 1
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'for id in 0 1; do SLURM_NODEID=$id "$@"; done\n')
    (bin_dir / "fedzero").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m fedzero.cli "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[001-002]",
           "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT)}
    return {"env": env, "log": log}


def test_make_hostfile_lists_the_jobs_nodes_with_their_gpus(tmp_path):
    tools = fake_tools(tmp_path)
    subprocess.run([SLURM / "make_hostfile.sh", tmp_path / "hostfile"], env=tools["env"], check=True)
    assert (tmp_path / "hostfile").read_text() == "node001 slots=8\nnode002 slots=8\n"


def test_client_job_runs_one_deepspeed_launcher_per_node_in_serve_mode(tmp_path):
    tools = fake_tools(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "clients" / "big").mkdir(parents=True)
    env = {**tools["env"], "RUN_DIR": str(run_dir), "CLIENT": "big"}
    subprocess.run(["bash", SLURM / "client.sbatch"], env=env, check=True, cwd=ROOT)
    calls = tools["log"].read_text().splitlines()
    assert len(calls) == 2
    for node_rank, call in enumerate(calls):
        assert call.startswith(f"deepspeed --hostfile {run_dir}/clients/big/hostfile.4242 --no_ssh --node_rank {node_rank} "
                               f"--master_addr node001 --master_port 29742 launch/client.py")
        assert call.endswith(f"--config {run_dir}/clients/big/client.yaml --store {run_dir}/store --round 0 --serve")


def test_aggregate_job_runs_every_round(tmp_path):
    tools = fake_tools(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"federation": {"rounds": 3}}))
    # the job reads the round count with the real python; then "python" is the stand-in
    env = {**tools["env"], "RUN_DIR": str(run_dir), "DEADLINE": "600"}
    script = (SLURM / "aggregate.sbatch").read_text().replace("rounds=$(python", f"rounds=$({sys.executable}")
    (tmp_path / "agg.sbatch").write_text(script)
    subprocess.run(["bash", tmp_path / "agg.sbatch"], env=env, check=True, cwd=ROOT)
    calls = [c for c in tools["log"].read_text().splitlines() if "aggregate.py" in c]
    assert [c.split("--round ")[1].split()[0] for c in calls] == ["0", "0", "1", "1", "2", "2"]  # 2 fake srun "nodes"
    assert all("--deadline 600" in c for c in calls)


def test_submit_prepares_the_run_and_submits_clients_and_aggregator(tmp_path):
    tools = fake_tools(tmp_path)
    from test_simulate import tiny_run

    run_yaml = tiny_run(tmp_path)
    run_dir = tmp_path / "run"
    subprocess.run(["bash", SLURM / "submit.sh", run_yaml, run_dir], env=tools["env"], check=True, cwd=ROOT)
    calls = tools["log"].read_text().splitlines()
    assert calls[0] == f"sbatch --nodes 1 --gpus-per-node 1 --export=ALL,RUN_DIR={run_dir},CLIENT=a launch/slurm/client.sbatch"
    assert calls[1].endswith("CLIENT=b launch/slurm/client.sbatch")
    assert calls[2] == f"sbatch --ntasks 4 --export=ALL,RUN_DIR={run_dir} launch/slurm/aggregate.sbatch"
    assert (run_dir / "clients" / "a" / "client.yaml").is_file()
    assert (run_dir / "store" / "rounds").is_dir()
