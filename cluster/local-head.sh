#!/usr/bin/env bash
# Try the cluster workflow on one machine: a Ray head with its dashboard on loopback, plus logical GPUs so the
# GPU-group settings of a job can be tried without GPUs. Ray's token authentication is on, as on every cluster
# path we ship: the token is ~/.ray/auth_token (made here if missing), where tgdpo-ray reads it.
#   cluster/local-head.sh            # then: tgdpo-ray submit jobs/demo.yaml --address http://127.0.0.1:8265 --wait
#   .venv/bin/ray stop               # when done
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=".venv/bin/ray"
[ -x "$RAY" ] || { echo "run 'make setup' first" >&2; exit 1; }
# Job drivers run `python`: put this environment's first on the PATH the head hands them.
export PATH="$PWD/.venv/bin:$PATH"
"$RAY" get-auth-token --generate >/dev/null
export RAY_AUTH_MODE=token  # the head's processes, job drivers included, inherit it
"$RAY" start --head --port="${PORT:-6379}" --node-ip-address=127.0.0.1 \
  --dashboard-host=127.0.0.1 --dashboard-port="${DASHBOARD_PORT:-8265}" --num-cpus="${NUM_CPUS:-8}" --num-gpus="${NUM_GPUS:-0}" --labels="${LABELS:-}" --include-dashboard=true \
  --disable-usage-stats
echo "dashboard and job API: http://127.0.0.1:${DASHBOARD_PORT:-8265}"
