#!/usr/bin/env bash
# The GPU check: on one GPU, what this project's trainers do there, in calls of under 9 minutes.
#
#   bash bench/gpu_check.sh [SOURCE] [--mode speed|train] [--framework torch|jax] [--quick]
#
# SOURCE: a folder holding cifar-10-batches-py/ or cifar10_jpeg.npz (default: .gpu-data/, ignored
# by git, so the check needs nothing beside the repository). Everything it writes goes to
# $GPU_CHECK_DIR (default .gpu-data/). Each step runs under its own time limit; a mode's limits
# add up to at most 8 min 50 s, so one device call of 10 minutes runs it with time to spare.
#   --mode speed (the default):
#     1. lay out CIFAR-10 (bench/layout_cifar10.py), note the versions and the GPU;
#     2. a 3-epoch run of each trainer, and of torch_impl.train --compile off (end-to-end pairs/s
#        from metrics.jsonl, the first epoch, which compiles, left out);
#     3. bench/throughput.py at the default recipe, batch 512: each trainer's step alone and end to
#        end with the views on the host and on the device, the augmentation alone;
#     4. eager against torch.compile and CUDA graphs (reduce-overhead) at the launch-bound batch
#        256.
#   --mode train: 1., then a 5-minute --time-budget run of the default recipe with --framework's
#     trainer (default torch), the kNN monitor on, then its CIFAR-10 linear probe.
# Both print one table (bench/gpu_report.py). --quick does the same in a minute or two on a CPU
# (smoke preset, shorter budget), to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.

work="${GPU_CHECK_DIR:-.gpu-data}"
source="$work"
quick=0 mode=speed framework=torch
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --mode) mode="${2:-}"; shift ;;
        --framework) framework="${2:-}"; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $1 (see --help)"; exit 2 ;;
        *) source="$1" ;;
    esac
    shift
done
case "$mode" in speed|train) ;; *) echo "error: --mode is speed or train, not '$mode'"; exit 2 ;; esac
case "$framework" in torch|jax) ;; *)
    echo "error: --framework is torch or jax, not '$framework'"; exit 2 ;; esac

if [ "$quick" = 1 ]; then
    preset=smoke batch=16 steps=2 budget=60s limit=150
else
    preset=default batch=512 steps=30 budget=5m limit=120
fi
mkdir -p "$work"
work="$(cd "$work" && pwd)"
out="$work/check-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
export JAX_COMPILATION_CACHE_DIR="$work/jax-cache"

step() {  # step NAME SECONDS COMMAND...: run it under a limit, its output into $out/NAME.log
    local name="$1" seconds="$2"
    shift 2
    local started=$SECONDS
    timeout "$seconds" "$@" > "$out/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status after $((SECONDS - started)) s (log: $out/$name.log)"
    return 0
}

started=$SECONDS
timeout 20 python -c "import sys, torch, jax, flax, optax, numpy; print(sys.version.split()[0], 'torch',
    torch.__version__, 'jax', jax.__version__, 'flax', flax.__version__, 'optax',
    optax.__version__, 'numpy', numpy.__version__, jax.devices())" > "$out/versions.log" 2>&1
nvidia-smi -L >> "$out/versions.log" 2>&1
data="$(timeout 45 python bench/layout_cifar10.py "$source" "$work")" || {
    echo "error: could not lay out CIFAR-10 from $source"; exit 2; }
echo "data: $data"
if [ "$mode" = speed ]; then
    for fw in torch jax; do
        step "$fw-3-epochs" 90 python -m "${fw}_impl.train" --preset "$preset" \
            --batch-size "$batch" --epochs 3 --warmup-epochs 1 --no-probe --data-dir "$data" \
            --out "$out/$fw-3-epochs"
    done
    [ "$quick" = 1 ] || step torch-eager-3-epochs 90 python -m torch_impl.train \
        --preset "$preset" --compile off --batch-size "$batch" --epochs 3 --warmup-epochs 1 \
        --no-probe --data-dir "$data" --out "$out/torch-eager-3-epochs"
    step bench "$limit" python bench/throughput.py --preset "$preset" --batch-size "$batch" \
        --steps "$steps" --rows trainers,augment
    [ "$quick" = 1 ] || step compile 75 python bench/throughput.py --preset "$preset" \
        --batch-size 256 --steps "$steps" --rows compile
else
    # the budget covers start-up and compiling; the probe after it takes about a minute
    step "$framework-$budget" 465 python -m "${framework}_impl.train" --preset "$preset" \
        --batch-size "$batch" --time-budget "$budget" --data-dir "$data" \
        --out "$out/$framework-$budget"
fi
echo "all steps: $((SECONDS - started)) s"
python bench/gpu_report.py "$out"
