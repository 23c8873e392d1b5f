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
    for name in ("deepspeed",):
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> {log}\n')
    # sbatch records its call and answers a job id (--parsable); squeue lists the ids in `queued`
    (bin_dir / "sbatch").write_text(f'#!/usr/bin/env bash\necho "sbatch $*" >> {log}\n'
                                    f'echo $((1000 + $(grep -c ^sbatch {log})))\n')
    (bin_dir / "squeue").write_text(f'#!/usr/bin/env bash\nwhile [[ $# -gt 0 ]]; do [[ $1 == -j ]] && id=$2; shift; done\n'
                                    f'grep -qx "$id" {tmp_path}/queued 2>/dev/null && echo RUNNING || true\n')
    # python: `python -m fedzero...` / `python -c` run for real (the job reads its config); else recorded
    (bin_dir / "python").write_text(f'#!/usr/bin/env bash\nif [[ $1 == -m || $1 == -c ]]; then exec {sys.executable} "$@"; fi\n'
                                    f'echo "python $*" >> {log}\n')
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
    subprocess.run(["bash", SLURM / "client.sbatch"], env=env, check=True, cwd=tmp_path)   # SLURM_SUBMIT_DIR is ROOT
    calls = tools["log"].read_text().splitlines()
    assert len(calls) == 2
    for node_rank, call in enumerate(calls):
        assert call.startswith(f"deepspeed --hostfile {run_dir}/clients/big/hostfile.4242 --no_ssh --node_rank {node_rank} "
                               f"--master_addr node001 --master_port 29742 {ROOT}/launch/client.py")
        assert call.endswith(f"--config {run_dir}/clients/big/client.yaml --store {run_dir}/store --round 0 --serve")


def test_aggregate_job_reads_the_rounds_with_fedzeros_config_reader_and_runs_every_round(tmp_path):
    tools = fake_tools(tmp_path)
    from test_simulate import tiny_run

    run_yaml = tiny_run(tmp_path, rounds=3)
    text = run_yaml.read_text()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(text)
    (run_dir / "data").symlink_to(tmp_path / "data")
    env = {**tools["env"], "RUN_DIR": str(run_dir), "DEADLINE": "600"}
    subprocess.run(["bash", SLURM / "aggregate.sbatch"], env=env, check=True, cwd=tmp_path)
    calls = [c for c in tools["log"].read_text().splitlines() if "aggregate.py" in c]
    assert [c.split("--round ")[1].split()[0] for c in calls] == ["0", "0", "1", "1", "2", "2"]  # 2 fake srun "nodes"
    assert all(c.startswith(f"python {ROOT}/launch/aggregate.py ") and "--deadline 600" in c for c in calls)


def test_aggregate_job_stops_on_a_config_fedzero_refuses(tmp_path):
    tools = fake_tools(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"federation": {"rounds": 3}}))   # no clients
    env = {**tools["env"], "RUN_DIR": str(run_dir)}
    proc = subprocess.run(["bash", SLURM / "aggregate.sbatch"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "clients" in proc.stderr
    assert not tools["log"].exists() or "aggregate.py" not in tools["log"].read_text()


def test_submit_prepares_the_run_and_submits_clients_and_aggregator(tmp_path):
    tools = fake_tools(tmp_path)
    from test_simulate import tiny_run

    run_yaml = tiny_run(tmp_path)
    run_dir = tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["bash", SLURM / "submit.sh", run_yaml, run_dir], env=tools["env"], check=True, cwd=elsewhere)
    calls = tools["log"].read_text().splitlines()
    assert calls[0] == (f"sbatch --parsable --nodes 1 --gpus-per-node 1 --job-name fedzero-client-a --chdir {run_dir} "
                        f"--output {run_dir}/logs/slurm-client-a-%j.out {run_dir}/slurm/client-a.sbatch")
    assert calls[1].endswith(f"{run_dir}/slurm/client-b.sbatch")
    assert calls[2] == (f"sbatch --parsable --ntasks 4 --job-name fedzero-aggregate --chdir {run_dir} "
                        f"--output {run_dir}/logs/slurm-aggregate-%j.out {run_dir}/slurm/aggregate.sbatch")
    assert (run_dir / "clients" / "a" / "client.yaml").is_file()
    assert (run_dir / "store" / "rounds").is_dir()
