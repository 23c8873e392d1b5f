#!/usr/bin/env bash
# Submit a whole federation to Slurm: one job per client plus the aggregator job.
#
#   launch/slurm/submit.sh RUN.yaml RUN_DIR [DS_CONFIG]
#
# Per-client resources come from RUN_DIR/slurm.env if present, one line per client:
#   CLIENT_llama70b="--nodes 2 --gpus-per-node 8"
# (default: one node, one GPU). AGGREGATOR_ARGS (default "--ntasks 4") sizes the aggregator job.
set -euo pipefail
run_yaml=${1:?usage: submit.sh RUN.yaml RUN_DIR [DS_CONFIG]}
run_dir=${2:?usage: submit.sh RUN.yaml RUN_DIR [DS_CONFIG]}
fedzero prepare --config "$run_yaml" --out "$run_dir" ${3:+--ds-config "$3"}
[ -f "$run_dir/slurm.env" ] && source "$run_dir/slurm.env"
for client_dir in "$run_dir"/clients/*/; do
    client=$(basename "$client_dir")
    var="CLIENT_${client//[^A-Za-z0-9_]/_}"
    # shellcheck disable=SC2086  # the resource string is meant to split into sbatch options
    sbatch ${!var:---nodes 1 --gpus-per-node 1} --export=ALL,RUN_DIR="$run_dir",CLIENT="$client" launch/slurm/client.sbatch
done
# shellcheck disable=SC2086
sbatch ${AGGREGATOR_ARGS:---ntasks 4} --export=ALL,RUN_DIR="$run_dir" launch/slurm/aggregate.sbatch
