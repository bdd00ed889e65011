#!/usr/bin/env bash
# Submit a GRPO run to a Ray cluster as a job: `ray job submit` runs `python -m qerl_rollout.train`
# as the job's driver, which joins the cluster and places the trainer workers and engines in
# actors (the driver itself holds no model and reserves no GPU).
#
#   bash examples/submit_ray_job.sh
#       the tiny CPU config on Ray: 2 FSDP2 trainer workers + 2 engines (placement.mode=split), 3 steps
#   bash examples/submit_ray_job.sh config=grpo_qwen3_30b model.path=/models/Qwen3-30B-A3B task.path=/data/math.jsonl
#
# RAY_JOB_ADDRESS: the cluster's job server (default http://127.0.0.1:8265, what `ray start --head`
# opens with ray[default]). Clusters that `ray start` created on Ray >= 2.60 use token
# authentication: run this where the cluster's token is (~/.ray/auth_token) with RAY_AUTH_MODE=token.
# QERL_OUTPUT_DIR: where the run directory goes (default $PWD/runs). It must be absolute, and on
# storage every node sees: the job runs in Ray's working directory, not here.
# PYTHON: the interpreter on the cluster nodes that has qerl_rollout installed (default: python).
set -euo pipefail

address=${RAY_JOB_ADDRESS:-http://127.0.0.1:8265}
out=${QERL_OUTPUT_DIR:-$PWD/runs}
case "$out" in /*) ;; *) echo "QERL_OUTPUT_DIR must be an absolute path, got $out" >&2; exit 2 ;; esac
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
    args=(placement.mode=split trainer.num_workers=2 rollout.num_engines=2 run.router_stats_every=0
          run.steps=3 eval.every=0)
fi
exec ray job submit --address "$address" -- "${PYTHON:-python}" -m qerl_rollout.train \
    run.output_dir="$out" "${args[@]}"
