#!/usr/bin/env bash
# Profile swap and recompute costs on a GPU machine that has torch but no vLLM and no install of
# AdaptiveLLM: the torch-only profiler (`python -m adaptivellm.predictors.cli`) on a real-size
# layer stack with random weights, trained and scored there, the profile and its summary saved.
#
#   bash bench/gpu_profile.sh OUTDIR CONFIG.json [profile flags...]
#
# CONFIG.json is a Hugging Face config (bench/models/ holds Llama-3-8B's and -70B's shapes).
# Flags after it go to the profiler and override the defaults `--device cuda --dtype bfloat16`
# (`--quick`, `--reps N`, `--device cpu --dtype float32` to try the script on a CPU machine).
# Writes OUTDIR/profile-NAME.json (the profile: samples and both fitted models), OUTDIR/
# predictors-NAME.json (the summary: held-out MAPE, grid, command) and OUTDIR/machine-NAME.txt
# (GPU, driver, torch). XGBoost comes from the environment, or from wheels in ./.whl (a GPU
# machine with no package registry: `pip download xgboost-cpu` into .whl here, carry it there).
# PYTHON picks the interpreter (default python3). Exit codes: the profiler's (0 saved, 2 bad
# input), 2 for a bad command line.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash bench/gpu_profile.sh OUTDIR CONFIG.json [profile flags...]" >&2
    exit 2
fi
out=$1
config=$2
shift 2
if [ ! -f "$config" ]; then
    echo "error: no model config at $config" >&2
    exit 2
fi
python=${PYTHON:-python3}
name=$(basename "$config" .json)
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")

# The adaptivellm package without installing it: its folders linked as pyproject.toml maps them.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
mkdir "$site/adaptivellm"
for path in "$repo"/adaptivellm/*; do
    ln -s "$path" "$site/adaptivellm/"
done
for sub in predictors scheduler split_client patches; do
    ln -s "$repo/$sub" "$site/adaptivellm/$sub"
done
pythonpath=$site
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site/deps" "$repo"/.whl/*.whl
    pythonpath=$site:$site/deps
fi
export PYTHONPATH=$pythonpath${PYTHONPATH:+:$PYTHONPATH}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    fi
    "$python" -c 'import torch, xgboost; print("torch", torch.__version__, "cuda", torch.version.cuda, "xgboost", xgboost.__version__)'
} | tee "$out/machine-$name.txt"

# Run from the linked package's folder: `python -m` puts the working directory first on the path,
# and the repo root's own adaptivellm/ folder would hide the linked one.
cd "$site"
"$python" -m adaptivellm.predictors.cli "$config" --device cuda --dtype bfloat16 "$@" \
    --out "$out/profile-$name.json" --summary "$out/predictors-$name.json"
