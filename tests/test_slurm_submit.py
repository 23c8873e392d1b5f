"""`fedzero submit` (and launch/slurm/submit.sh): the settings file before or after prepare, from any
directory, --dry-run, no second submission of a job still queued, and a job script that runs.
Stand-ins for sbatch/squeue/srun/scontrol/deepspeed record what they are asked (no Slurm here)."""

import json
import subprocess
import sys

from test_simulate import tiny_run
from test_slurm import ROOT, SLURM, fake_tools


def fedzero(args, tools, cwd):
    return subprocess.run([sys.executable, "-m", "fedzero.cli", *args], env=tools["env"], cwd=cwd,
                          capture_output=True, text=True)


def sbatch_calls(tools):
    return [c for c in tools["log"].read_text().splitlines() if c.startswith("sbatch")] if tools["log"].exists() else []


SETTINGS = ('PARTITION=gpu\nACCOUNT=proj42   # the site\n'
            'SETUP="module load cuda/12.4; source /shared/venv/bin/activate"\n'
            'CLIENT_b="--nodes 2 --gpus-per-node 8"\nAGGREGATOR="--ntasks 8"\nDEADLINE=600\n')


def test_settings_written_before_prepare_dry_run_prints_and_writes_nothing(tmp_path):
    tools = fake_tools(tmp_path)
    run_yaml, run_dir = tiny_run(tmp_path), tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "slurm.env").write_text(SETTINGS)          # before `fedzero prepare`
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = fedzero(["submit", "--config", str(run_yaml), "--out", "../run", "--dry-run"], tools, elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert sbatch_calls(tools) == []
    assert sorted(p.name for p in run_dir.iterdir()) == ["slurm.env"]          # nothing prepared, nothing written
    out = proc.stdout
    assert (f"$ sbatch --parsable --partition gpu --account proj42 --nodes 2 --gpus-per-node 8 --job-name "
            f"fedzero-client-b --chdir {run_dir}") in out
    assert "--nodes 1 --gpus-per-node 1 --job-name fedzero-client-a" in out
    assert "--ntasks 8 --job-name fedzero-aggregate" in out
    assert "module load cuda/12.4; source /shared/venv/bin/activate" in out
    assert f"export FEDZERO_LAUNCH={ROOT}/launch" in out and "export DEADLINE=600" in out and "export ROUNDS=2" in out


def test_submit_twice_keeps_queued_jobs_and_resubmits_ended_ones(tmp_path):
    tools = fake_tools(tmp_path)
    run_yaml, run_dir = tiny_run(tmp_path), tmp_path / "run"
    assert fedzero(["prepare", "--config", str(run_yaml), "--out", str(run_dir)], tools, tmp_path).returncode == 0
    (run_dir / "slurm.env").write_text(SETTINGS)          # after `fedzero prepare`
    proc = subprocess.run(["bash", SLURM / "submit.sh", run_yaml, run_dir], env=tools["env"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    first = sbatch_calls(tools)
    assert len(first) == 3 and "--partition gpu --account proj42" in first[0]
    record = json.loads((run_dir / "slurm" / "submitted.json").read_text())
    assert {k: v["job_id"] for k, v in record.items()} == {"client-a": "1001", "client-b": "1002", "aggregate": "1003"}
    script = (run_dir / "slurm" / "client-b.sbatch").read_text()
    assert "export CLIENT=b" in script and "#SBATCH --ntasks-per-node=1" in script

    (tmp_path / "queued").write_text("1001\n1003\n")       # client b's job has ended; a and the aggregator run
    proc = fedzero(["submit", "--config", str(run_yaml), "--out", str(run_dir)], tools, tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = sbatch_calls(tools)[3:]
    assert len(again) == 1 and again[0].endswith(f"{run_dir}/slurm/client-b.sbatch")
    assert "client-a: already queued as job 1001" in proc.stdout
    assert json.loads((run_dir / "slurm" / "submitted.json").read_text())["client-b"]["job_id"] == "1004"


def test_a_rendered_client_job_runs_from_anywhere(tmp_path):
    tools = fake_tools(tmp_path)
    run_yaml, run_dir = tiny_run(tmp_path), tmp_path / "run"
    assert fedzero(["submit", "--config", str(run_yaml), "--out", str(run_dir)], tools, tmp_path).returncode == 0
    env = {k: v for k, v in tools["env"].items() if k != "SLURM_SUBMIT_DIR"}
    subprocess.run(["bash", run_dir / "slurm" / "client-a.sbatch"], env=env, check=True, cwd="/")
    calls = [c for c in tools["log"].read_text().splitlines() if c.startswith("deepspeed")]
    assert len(calls) == 2 and all(f"{ROOT}/launch/client.py --config {run_dir}/clients/a/client.yaml" in c for c in calls)
    assert (run_dir / "clients" / "a" / "hostfile.4242").read_text() == "node001 slots=8\nnode002 slots=8\n"


def test_settings_mistakes_name_file_line_and_key(tmp_path):
    tools = fake_tools(tmp_path)
    run_yaml, run_dir = tiny_run(tmp_path), tmp_path / "run"
    run_dir.mkdir()
    for text, expected in (('CLIENT_c="--nodes 1"\n', "slurm.env:1: CLIENT_c: the run has no client 'c' (its clients: a, b)"),
                           ('PARTITON=gpu\n', "slurm.env:1: unknown key PARTITON"),
                           ('\nSETUP="module load x\n', "slurm.env:2: SETUP: No closing quotation"),
                           ('DEADLINE=soon\n', "DEADLINE must be a number of seconds, got 'soon'")):
        (run_dir / "slurm.env").write_text(text)
        proc = fedzero(["submit", "--config", str(run_yaml), "--out", str(run_dir), "--dry-run"], tools, tmp_path)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sbatch_calls(tools) == []


def test_a_bad_deepspeed_config_is_refused_before_anything_is_submitted(tmp_path):
    tools = fake_tools(tmp_path)
    run_yaml, run_dir = tiny_run(tmp_path), tmp_path / "run"
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["overlap_com"] = True          # a typo of overlap_comm
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps(ds))
    proc = fedzero(["submit", "--config", str(run_yaml), "--out", str(run_dir), "--ds-config", str(bad)], tools, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}: DeepSpeed refuses this config" in proc.stderr and "zero_optimization.overlap_com" in proc.stderr
    assert sbatch_calls(tools) == [] and not run_dir.exists()


def test_prepare_checks_the_deepspeed_json_before_writing_anything(tmp_path):
    tools = fake_tools(tmp_path)
    run_yaml, run_dir = tiny_run(tmp_path), tmp_path / "run"
    ds = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    cases = {"device": (lambda d: d["zero_optimization"]["offload_param"].update(device="gpu"),
                        "zero_optimization.offload_param.device: Input should be 'none', 'cpu' or 'nvme' (got 'gpu')"),
             "owned": (lambda d: d.update(train_batch_size=8), "DeepSpeed config sets 'train_batch_size'"),
             "optimizer": (lambda d: d["optimizer"].update(type="Adamm"), "optimizer.type 'Adamm' is neither")}
    for name, (spoil, expected) in cases.items():
        bad = json.loads(json.dumps(ds))
        spoil(bad)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bad))
        proc = fedzero(["prepare", "--config", str(run_yaml), "--out", str(run_dir), "--ds-config", str(path)], tools, tmp_path)
        assert proc.returncode == 2 and f"{path}: " in proc.stderr and expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not run_dir.exists()
    for shipped in ("zero2.json", "zero3.json", "zero3_offload.json"):
        from fedzero.ds_config import check_ds_config_file

        check_ds_config_file(ROOT / "ds_configs" / shipped)
