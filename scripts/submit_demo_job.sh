#!/usr/bin/env bash
# Run jobs/adapt.py as a Ray job on a local Ray cluster with token authentication on, as
# README 'Run as a Ray job' explains step by step. Extra arguments go to jobs/adapt.py.
#
#   bash scripts/submit_demo_job.sh                      # the demo; report in outputs/job_demo/report.md
#   RAY_DASHBOARD=http://head:8265 bash scripts/submit_demo_job.sh --output /shared/run1
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENV_BIN="$REPO/.venv/bin"                    # the README's install command made it
export PATH="$VENV_BIN:$PATH"                  # `ray` and `python` of the project's venv
export RAY_AUTH_MODE=token                     # a client reads ~/.ray/auth_token only in this mode
DASHBOARD="${RAY_DASHBOARD:-http://127.0.0.1:8265}"

if ! ray job list --address "$DASHBOARD" >/dev/null 2>&1; then
  echo "no Ray cluster at $DASHBOARD: starting a local head node (stop it with: $VENV_BIN/ray stop)"
  # the raylet expects as many workers starting at once as the CPUs it declares (ray_utils.local_cluster_resources);
  # without this it warns every driver that "8 PYTHON worker processes have been started"
  RAY_worker_maximum_startup_concurrency=8 \
    ray start --head --dashboard-host 127.0.0.1 --num-cpus 8 --disable-usage-stats >/dev/null
fi

# The job runs in a copy of this directory on the cluster: its interpreter is named by an
# absolute path (the venv, which every node of a local cluster shares), and its demo data and
# outputs by absolute paths, or they would land in that temporary copy.
RUNTIME_ENV='{"excludes": [".venv", ".git", "demo_data", "outputs", "benchmarks/results", "*.pyc", ".hypothesis"]}'
ray job submit --address "$DASHBOARD" --working-dir . --runtime-env-json "$RUNTIME_ENV" -- \
  "$VENV_BIN/python" jobs/adapt.py --demo.root "$REPO/demo_data" --output "$REPO/outputs/job_demo" "$@"
