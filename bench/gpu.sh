#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU, at most 8 minutes in all:
#   1. installs what is missing, from the package registries only (torch pinned to the version used on the CPU),
#   2. runs the CUDA-capable tests (every device against the float64 CPU image, device handling),
#   3. prints per-slice latency at batch 1 and 16 for 128² and 256², 8 coils, both solvers, on the GPU, and the
#      same cases on the CPU beside them (batch 1; batch 16 at 128²),
#   4. continues the CPU training run for a short burst on the GPU from a copy of its checkpoint (resumable:
#      run it again and it goes on from where the burst stopped); BURST_SIZE=256 trains it on 256² scans from
#      there on (the CPU campaign stopped at 128²).
# Results go to $OUT (default docs/gpu/): one Markdown file per step and the burst's log.
#
#   bash bench/gpu.sh [checkpoint]          (default checkpoint: runs/campaign-T16.ckpt; runs/ is git-ignored, so
#                                            a remote machine needs it carried along)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/gpu}
CHECKPOINT=${1:-runs/campaign-T16.ckpt}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( 470 - ($(date +%s) - start) )); }   # seconds left of the 8 minutes, with a margin
step() { echo "== $1 ($(left) s left)" >&2; }

step "environment"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    timeout 180 python -m pip install -q "torch==${TORCH_VERSION}" || echo "torch ${TORCH_VERSION} not installed" >&2
fi
python -c "import cdl_lambda.recon, cdl_lambda.lab, skimage, scipy, nibabel, pytest" 2>/dev/null ||
    timeout 120 python -m pip install -q -e ".[test]" -e ./lab || echo "project dependencies not installed" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
    | tee -a "$OUT/device.txt"

step "CUDA tests"
timeout 120 python -m pytest -q -p no:cacheprovider tests/recon/test_admm.py tests/recon/test_device.py \
    -k "device or cuda" 2>&1 | tail -5 | tee "$OUT/tests.txt"

step "latency on the GPU"
for batch in 1 16; do
    timeout 90 python bench/latency.py --device cuda --batch "$batch" --repeats 3 --cases 128x8 256x8 \
        --out "$OUT/latency_cuda_b${batch}.md" >/dev/null || echo "GPU latency at batch $batch did not finish" >&2
done

step "latency on the CPU beside it"
threads=$(nproc)
timeout 80 python bench/latency.py --device cpu --threads "$threads" --batch 1 --repeats 1 --cases 128x8 256x8 \
    --out "$OUT/latency_cpu_b1.md" >/dev/null || echo "CPU latency at batch 1 did not finish" >&2
timeout 60 python bench/latency.py --device cpu --threads "$threads" --batch 16 --repeats 1 --cases 128x8 \
    --solvers admm --out "$OUT/latency_cpu_b16.md" >/dev/null || echo "CPU latency at batch 16 did not finish" >&2

step "training burst"
if [ -f "$CHECKPOINT" ]; then
    burst="$OUT/burst.ckpt"
    [ -f "$burst" ] || cp "$CHECKPOINT" "$burst"
    # the run's time limit counts its total seconds, CPU part included: the burst gets what is left of the 8 minutes
    minutes=$(python -c "import torch; s = torch.load('$burst', weights_only=True)['seconds']
print(s / 60 + max(0.5, ($(left) - 60) / 60))")
    config=$(python -c "import torch; c = torch.load('$burst', weights_only=True)['config']; flag = lambda k, v: (
        f'--{k}' if v is True else f'--no-{k}' if v is False else f'--{k} {v}'); print(' '.join(
        flag(k.replace('_', '-'), v) for k, v in c.items() if v is not None and k not in
        ('method', 'time_limit_min', 'validate_every', 'weights_dir')))")
    timeout $(( $(left) > 30 ? $(left) - 10 : 20 )) python -m cdl_lambda.lab.cli train --resume --device cuda \
        --method v3 $config ${BURST_SIZE:+--size "$BURST_SIZE"} --steps 100000000 --validate-every 100000 --time-limit-min "$minutes" --checkpoint "$burst" \
        > "$OUT/burst.log" 2>&1 || echo "training burst stopped by its time limit" >&2
    python -c "import torch; s = torch.load('$burst', weights_only=True); print('burst checkpoint at step', s['step'])" \
        | tee -a "$OUT/burst.log"
else
    echo "no checkpoint at $CHECKPOINT: no training burst" | tee "$OUT/burst.log"
fi
cat "$OUT"/latency_*.md 2>/dev/null
echo "done in $(( $(date +%s) - start )) s"
