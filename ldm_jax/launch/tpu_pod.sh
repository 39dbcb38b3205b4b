#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM (a single host or a pod slice), from nothing.
#
#   ldm_jax/launch/tpu_pod.sh TPU_NAME ZONE gs://BUCKET/runs/NAME --config=configs/cifar10.py [FLAGS...]
#
# 1. copies this repository (its tracked files, or its top-level entries outside git) to
#    every worker,
# 2. installs Python 3.11 and `pip install -e '.[tpu]'` in ~/ldm_jax/.venv on every worker,
# 3. starts `python -m ldm_jax.main --workdir=gs://... FLAGS` on all workers at once, in the
#    background (JAX finds the other hosts itself); each worker logs to ~/ldm_jax/train.log.
#
# The workdir must be a gs:// URI (or another path every worker shares). Rerunning the
# script resumes the run; steps 1-2 are quick when nothing changed. Extra flags go to
# ldm_jax.main as they are, e.g. --config.data.data_dir=gs://BUCKET/tfds to prepare a
# TFDS dataset once for all hosts. Environment: GCLOUD (default gcloud), PROJECT
# (default: gcloud's), SKIP_INSTALL=1 to skip step 2.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
tpu=$1 zone=$2 workdir=$3
shift 3
gcloud=${GCLOUD:-gcloud}
repo=$(cd "$(dirname "$0")/../.." && pwd)
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")
ssh_all() {
  "$gcloud" compute tpus tpu-vm ssh "$tpu" --zone="$zone" "${project_flag[@]}" --worker=all \
    --command="$1"
}

archive=$(mktemp -d)/ldm_jax.tar.gz
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$repo" ls-files -z | tar -C "$repo" --null -T - -czf "$archive"
else  # Not a git checkout: the project's top-level entries, without caches.
  tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' -czf "$archive" \
    $(cd "$repo" && ls -d ldm_jax configs experiments benchmarks tests requirements.txt README.md \
      pyproject.toml LICENSE CITATION.cff 2>/dev/null)
fi
"$gcloud" compute tpus tpu-vm scp "$archive" "$tpu":ldm_jax.tar.gz --zone="$zone" \
  "${project_flag[@]}" --worker=all
ssh_all 'mkdir -p ~/ldm_jax && tar -xzf ~/ldm_jax.tar.gz -C ~/ldm_jax'

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  ssh_all 'set -e; cd ~/ldm_jax
    if ! command -v python3.11 >/dev/null; then
      sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv
    fi
    [ -d .venv ] || python3.11 -m venv .venv
    . .venv/bin/activate && pip install -q --upgrade pip && pip install -q -e ".[tpu]"'
fi

flags=$(printf ' %q' "--workdir=$workdir" "$@")
ssh_all "cd ~/ldm_jax && . .venv/bin/activate && \
  nohup python -m ldm_jax.main$flags > train.log 2>&1 < /dev/null &"
echo "started on every worker of $tpu; follow process 0 with:"
echo "  $gcloud compute tpus tpu-vm ssh $tpu --zone=$zone --worker=0 --command='tail -f ~/ldm_jax/train.log'"
