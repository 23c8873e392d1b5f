#!/usr/bin/env bash
# Submit a whole federation to Slurm: one job per client plus the aggregator job.
#
#   launch/slurm/submit.sh RUN.yaml RUN_DIR [DS_CONFIG] [--dry-run] [--resources FILE]
#
# = fedzero submit --config RUN.yaml --out RUN_DIR [--ds-config DS_CONFIG] ... (docs/cluster.md).
# Settings (partition, account, module loads, venv, per-client resources) come from RUN_DIR/slurm.env;
# launch/slurm/slurm.env.example lists them. Rerun it: jobs still queued are not submitted twice.
set -euo pipefail
run_yaml=${1:?usage: submit.sh RUN.yaml RUN_DIR [DS_CONFIG] [fedzero submit options]}
run_dir=${2:?usage: submit.sh RUN.yaml RUN_DIR [DS_CONFIG] [fedzero submit options]}
shift 2
ds=()
if [[ $# -gt 0 && $1 != --* ]]; then ds=(--ds-config "$1"); shift; fi
exec fedzero submit --config "$run_yaml" --out "$run_dir" "${ds[@]}" "$@"
