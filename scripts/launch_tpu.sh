#!/usr/bin/env bash
# Run one jaxarith command on every worker (host) of a Cloud TPU VM slice, one JAX process each.
#
#   scripts/launch_tpu.sh --tpu NAME --zone ZONE [--project P] [--workers N] [--repo DIR]
#       [--python PY] [--module train|jaxarith] [--logs DIR] [--dry-run] -- ARGS...
#
# Every worker runs `cd REPO && PY -m MODULE ARGS... --distributed` over `gcloud compute tpus
# tpu-vm ssh --worker=I` (all workers at once, each worker's output in LOGS/worker-I.log);
# jax.distributed detects the slice, so the same command runs on every host. The repository and
# its venv must already be on every worker at REPO (e.g. `--worker=all --command "git clone ..."`),
# and the config's `out`, checkpoints and data on storage every worker sees (gs://... paths).
# --workers defaults to the slice's host count (gcloud describe); --dry-run prints the
# per-worker commands and runs nothing.
#
# Example (see docs/scale.md):
#   scripts/launch_tpu.sh --tpu my-v5e-32 --zone us-east5-a -- \
#       configs/llama3_2_1b_cpt_pod.yaml out=gs://my-bucket/runs/cpt1
set -euo pipefail

tpu="" zone="" project="" workers="" repo='~/jaxarith' python='.venv/bin/python'
module="train" logs="logs/launch" dry_run=0
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
squote() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }  # one shell word, readable
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --module) module="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch_tpu.sh: unknown option $1 (arguments of the command go after --)" >&2
       usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "launch_tpu.sh: --tpu and --zone are required" >&2; usage; }
[[ $# -gt 0 ]] || { echo "launch_tpu.sh: give the command's arguments after --" >&2; usage; }
[[ "$module" == train || "$module" == jaxarith ]] || {
  echo "launch_tpu.sh: --module $module: expected train or jaxarith" >&2; exit 2; }

gcloud_args=(--zone "$zone")
[[ -n "$project" ]] && gcloud_args+=(--project "$project")
if [[ -z "$workers" ]]; then
  if [[ $dry_run == 1 ]]; then
    echo "launch_tpu.sh: --dry-run needs --workers N (the slice is not queried)" >&2; exit 2
  fi
  workers=$(gcloud compute tpus tpu-vm describe "$tpu" "${gcloud_args[@]}" \
              --format='value(networkEndpoints.len())')
fi
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "launch_tpu.sh: --workers $workers: expected a positive integer" >&2; exit 2; }

remote="cd $repo && $python -m $module $(printf '%q ' "$@")--distributed"
cmds=()
for ((i = 0; i < workers; i++)); do
  cmds+=("gcloud compute tpus tpu-vm ssh $tpu $(printf '%q ' "${gcloud_args[@]}")--worker=$i --command $(squote "$remote")")
done
if [[ $dry_run == 1 ]]; then
  printf '%s\n' "${cmds[@]}"
  exit 0
fi

mkdir -p "$logs"
pids=()
for ((i = 0; i < workers; i++)); do
  bash -c "${cmds[$i]}" >"$logs/worker-$i.log" 2>&1 &
  pids+=($!)
done
echo "launch_tpu.sh: started $workers workers; logs in $logs/worker-*.log (process 0 logs the run)" >&2
status=0
for ((i = 0; i < workers; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "launch_tpu.sh: worker $i failed; see $logs/worker-$i.log" >&2
    status=1
  fi
done
exit $status
