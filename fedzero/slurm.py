"""`fedzero submit`: a whole federation as Slurm jobs, one per client plus the aggregator.

    fedzero submit --config RUN.yaml --out RUN_DIR [--ds-config FILE] [--resources FILE] [--dry-run]

The site's and the run's Slurm settings live in one file, RUN_DIR/slurm.env (or --resources FILE),
written before or after `fedzero prepare` (launch/slurm/slurm.env.example lists every key):

    PARTITION=gpu                     ACCOUNT=my-project            TIME=24:00:00
    SETUP="module load cuda/12.4 openmpi; source /shared/venvs/fedzero/bin/activate"
    CLIENT_DEFAULT="--nodes 1 --gpus-per-node 1"
    CLIENT_big="--nodes 2 --gpus-per-node 8"
    AGGREGATOR="--ntasks 4"

For each job this writes the script it submits to RUN_DIR/slurm/<job>.sbatch (the template under
launch/slurm/ with the run's paths and SETUP filled in) and records the job id in
RUN_DIR/slurm/submitted.json. Run twice, a job whose recorded id is still queued or running
(`squeue`) is not submitted again; one that has ended is (the store resumes it where it stopped).
`--dry-run` prints the sbatch commands and the scripts and submits nothing, writes nothing.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedzero.bundled import bundled_path

RESOURCES_FILE = "slurm.env"          # RUN_DIR/slurm.env
JOBS_DIR = "slurm"                    # RUN_DIR/slurm/: the scripts submitted, submitted.json
RECORD = "submitted.json"
SITE_KEYS = {
    "PARTITION": "sbatch --partition",
    "ACCOUNT": "sbatch --account",
    "TIME": "sbatch --time (default: the script's 24:00:00)",
    "SETUP": "shell lines run first in every job: module loads, venv activation",
    "SBATCH_ARGS": "further sbatch options for every job (e.g. --qos high)",
    "CLIENT_DEFAULT": "sbatch resources of a client without its own CLIENT_<id> (default --nodes 1 --gpus-per-node 1)",
    "AGGREGATOR": "sbatch resources of the aggregator job (default --ntasks 4)",
    "SRUN_MPI": "srun's MPI option for the aggregator (default --mpi=pmix)",
    "DEADLINE": "seconds the aggregator waits for a round's quorum",
    "QUORUM": "clients needed per round (default: all)",
}
_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


class SlurmError(ValueError):
    """A user's mistake in the Slurm settings: the message names the file, line and key."""


@dataclass
class SlurmSettings:
    site: dict[str, str] = field(default_factory=dict)
    clients: dict[str, str] = field(default_factory=dict)      # client id -> sbatch resources
    source: Path | None = None


def read_settings(path: Path | None, client_ids: list[str]) -> SlurmSettings:
    """RUN_DIR/slurm.env: `KEY=value` lines (shell quoting), comments and blank lines. Every key is
    checked: an unknown key, or CLIENT_<id> for a client the run does not have, is an error."""
    settings = SlurmSettings(source=path)
    if path is None or not path.is_file():
        return settings
    by_var = {"CLIENT_" + re.sub(r"[^A-Za-z0-9_]", "_", cid): cid for cid in client_ids}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(stripped)
        if not match:
            raise SlurmError(f"{path}:{number}: expected KEY=value, got {stripped!r}")
        key, raw = match.groups()
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as err:
            raise SlurmError(f"{path}:{number}: {key}: {err}") from None
        value = " ".join(words)
        if key in SITE_KEYS:
            settings.site[key] = value
        elif key in by_var:
            settings.clients[by_var[key]] = value
        elif key.startswith("CLIENT_"):
            raise SlurmError(f"{path}:{number}: {key}: the run has no client {key[len('CLIENT_'):]!r} "
                             f"(its clients: {', '.join(client_ids)})")
        else:
            raise SlurmError(f"{path}:{number}: unknown key {key} (known: {', '.join(SITE_KEYS)}, CLIENT_<id>)")
    for key in ("DEADLINE", "QUORUM"):
        value = settings.site.get(key)
        if value:
            try:
                ok = float(value) >= 0 if key == "DEADLINE" else int(value) >= 1
            except ValueError:
                ok = False
            if not ok:
                raise SlurmError(f"{path}: {key} must be {'a number of seconds' if key == 'DEADLINE' else 'an integer >= 1'}, got {value!r}")
    return settings


@dataclass
class Job:
    name: str                 # "client-<id>" or "aggregate"
    command: list[str]        # the sbatch command line
    script: str               # the script's text
    script_path: Path


def render_script(template: Path, exports: dict[str, str], setup: str) -> str:
    """The template with a block after its header (shebang, comments, #SBATCH lines) that exports
    the run's values and runs SETUP: sbatch reads #SBATCH lines only before the first command."""
    lines = template.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    block = ["# --- written by fedzero submit ---", "set -eo pipefail                  # a failing SETUP line ends the job"]
    block += [f"export {key}={shlex.quote(value)}" for key, value in exports.items()]
    if setup:
        block += ["# SETUP from slurm.env", setup]
    block.append("# ---")
    return "\n".join(lines[:at] + block + lines[at:]) + "\n"


def plan_jobs(run, run_dir: Path, settings: SlurmSettings) -> list[Job]:
    site = settings.site
    launch = bundled_path("launch")
    common = []
    for key, option in (("PARTITION", "--partition"), ("ACCOUNT", "--account"), ("TIME", "--time")):
        if site.get(key):
            common += [option, site[key]]
    common += shlex.split(site.get("SBATCH_ARGS", ""))
    jobs_dir = run_dir / JOBS_DIR
    jobs = []
    base = {"RUN_DIR": str(run_dir), "FEDZERO_LAUNCH": str(launch)}
    for client in run.clients:
        name = f"client-{client.id}"
        resources = settings.clients.get(client.id) or site.get("CLIENT_DEFAULT") or "--nodes 1 --gpus-per-node 1"
        path = jobs_dir / f"{name}.sbatch"
        script = render_script(launch / "slurm" / "client.sbatch", {**base, "CLIENT": client.id}, site.get("SETUP", ""))
        command = ["sbatch", "--parsable", *common, *shlex.split(resources), "--job-name", f"fedzero-{name}",
                   "--chdir", str(run_dir), "--output", str(run_dir / "logs" / f"slurm-{name}-%j.out"), str(path)]
        jobs.append(Job(name, command, script, path))
    exports = {**base, "ROUNDS": str(run.federation.rounds)}
    for key in ("SRUN_MPI", "DEADLINE", "QUORUM"):
        if site.get(key):
            exports[key] = site[key]
    path = jobs_dir / "aggregate.sbatch"
    script = render_script(launch / "slurm" / "aggregate.sbatch", exports, site.get("SETUP", ""))
    command = ["sbatch", "--parsable", *common, *shlex.split(site.get("AGGREGATOR") or "--ntasks 4"),
               "--job-name", "fedzero-aggregate", "--chdir", str(run_dir),
               "--output", str(run_dir / "logs" / "slurm-aggregate-%j.out"), str(path)]
    jobs.append(Job("aggregate", command, script, path))
    return jobs


def _still_queued(job_id: str) -> bool | None:
    """True if squeue lists the job (pending, running, ...), False if not, None without squeue."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    proc = subprocess.run([squeue, "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def submit(config: str | Path, out: str | Path, ds_config: Path, resources: Path | None = None,
           dry_run: bool = False, echo=print) -> list[dict]:
    """Prepare RUN_DIR (unless dry_run) and submit what is not already queued. Returns, per job,
    {name, job_id, state}: state 'submitted', 'already queued', or 'dry run'."""
    from fedzero.config import parse_run_config, read_yaml
    from fedzero.ds_config import check_ds_config_file

    out = Path(out).expanduser().resolve()          # the jobs get absolute paths, whatever the cwd here
    raw, path = read_yaml(config)
    run = parse_run_config(raw, path.parent, source=path)        # checked whole before anything is written
    check_ds_config_file(ds_config)
    resources = Path(resources).expanduser().absolute() if resources else out / RESOURCES_FILE
    if resources != out / RESOURCES_FILE and not resources.is_file():
        raise FileNotFoundError(f"--resources {resources}: no such file")
    settings = read_settings(resources, [c.id for c in run.clients])
    if shutil.which("sbatch") is None and not dry_run:
        raise FileNotFoundError("`sbatch` not found on PATH: run this on a Slurm login node (or use --dry-run)")
    record_path = out / JOBS_DIR / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if dry_run:
        echo(f"# dry run: would run `fedzero prepare --config {path} --out {out} --ds-config {ds_config}`"
             + (f"; settings from {resources}" if resources.is_file() else f"; no {resources}: defaults"))
    else:
        from fedzero.federate import prepare

        prepare(path, out, ds_config)
    results = []
    for job in plan_jobs(run, out, settings):
        previous = record.get(job.name)
        if previous:
            queued = _still_queued(previous["job_id"])
            if queued is None and not dry_run:
                raise FileNotFoundError(f"{record_path} records job {previous['job_id']} for {job.name}, and "
                                        "`squeue` is not on PATH to tell whether it still runs; refusing to "
                                        "submit it twice")
            if queued:
                echo(f"{job.name}: already queued as job {previous['job_id']} ({record_path}), not submitted again")
                results.append({"name": job.name, "job_id": previous["job_id"], "state": "already queued"})
                continue
        if dry_run:
            echo(f"\n$ {shlex.join(job.command)}\n# {job.script_path}:\n{job.script}")
            results.append({"name": job.name, "job_id": None, "state": "dry run"})
            continue
        job.script_path.parent.mkdir(parents=True, exist_ok=True)
        job.script_path.write_text(job.script)
        job.script_path.chmod(0o755)
        proc = subprocess.run(job.command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(job.command)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        job_id = proc.stdout.strip().split(";")[0]
        record[job.name] = {"job_id": job_id, "command": job.command}
        tmp = record_path.with_name(RECORD + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(record_path)          # after every job: a failure halfway keeps what was submitted
        echo(f"{job.name}: submitted as job {job_id}")
        results.append({"name": job.name, "job_id": job_id, "state": "submitted"})
    return results


def rounds_of(config: str | Path) -> int:
    """federation.rounds of a run config, read by fedzero's own reader (aggregate.sbatch uses it)."""
    from fedzero.config import load_run_config

    return load_run_config(config).federation.rounds


if __name__ == "__main__":           # python -m fedzero.slurm rounds CONFIG
    if len(sys.argv) == 3 and sys.argv[1] == "rounds":
        try:
            print(rounds_of(sys.argv[2]))
        except (ValueError, FileNotFoundError) as err:      # ConfigError is a ValueError: file and key named
            sys.exit(f"fedzero: error: {err}")
    else:
        sys.exit("usage: python -m fedzero.slurm rounds RUN_CONFIG.yaml")
