#!/usr/bin/env bash
# Write a DeepSpeed hostfile for the nodes of this Slurm job: "<node> slots=<processes per node>".
#   launch/slurm/make_hostfile.sh OUT_FILE [SLOTS]
# SLOTS defaults to the job's GPUs per node (SLURM_GPUS_ON_NODE), else its tasks per node.
set -euo pipefail
out=${1:?usage: make_hostfile.sh OUT_FILE [SLOTS]}
slots=${2:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
: "${SLURM_JOB_NODELIST:?not inside a Slurm job (SLURM_JOB_NODELIST is unset)}"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=${slots}/" > "$out"
