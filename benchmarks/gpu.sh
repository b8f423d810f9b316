#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md in one run (an estimated 8-10 minutes on one H100/H200;
# this layout has not been timed as a whole):
#   1. tests/test_cuda.py: the same numbers on the GPU as on the CPU (float64);
#   2. sweep_vs_loop.py on the GPU, K = 1 and 64 (minibatch 512), with JAX;
#   3. the same at K = 1024, minibatch and full batch (the loop alone takes ~1.5 min);
#   4. fr.sweep(compile=True) at K = 64 and 1024 (its ratio: against the loop of 2 and 3);
#   5. models.py on the GPU (MLP 784-512-512-10, LeNet, Transformer encoder; K = 8, 64):
#      loop, fused loop, raw vmap, fr.sweep (measured plan), the same replayed from CUDA
#      graphs (plan={"cuda_graph": True}) and fr.sweep(compile=True) — the rows
#      benchmarks/README.md marks "not yet measured";
#   6. the tiny-MLP task at K = 64: sweep, CUDA-graph replay, compile=True vs raw vmap.
# Usage, from the repository root on a machine with a CUDA build of torch (jax and optax
# optional):  bash benchmarks/gpu.sh [OUTDIR]      (default OUTDIR: gpu-results)
# Each part has its own time limit, so a failing part leaves the others' results.
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$out/machine.txt"

timeout 120 "$py" -m pytest -q -p no:cacheprovider -p no:logging tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"

bench() {  # bench NAME SECONDS ARGS...: one sweep_vs_loop run, table and log under $out
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$py" benchmarks/sweep_vs_loop.py --device "${DEVICE:-cuda}" --warmup 3 --min-steps 12 \
        --json "$out/$name.json" "$@" > >(tee "$out/$name.md") 2> >(tee "$out/$name.log" >&2)
}
bench sweep_gpu 240 --k 1 64 --full-k --impls loop,vmap,sweep,jax --repeats 1
bench wide_gpu 360 --k 1024 --full-k 1024 --impls loop,vmap,sweep,jax --repeats 1
bench compile_gpu 200 --k 64 1024 --full-k --impls sweep-compile --repeats 1
timeout 420 "$py" benchmarks/models.py --device "${DEVICE:-cuda}" --models mlp,cnn,transformer \
    --k 8 64 --impls loop,fused,vmap,sweep,graph --compile --rounds 2 \
    --json "$out/models_gpu.json" --out "$out/models_gpu.md" \
    2>&1 | tee "$out/models_gpu.log"
# 6. the task of sweep_vs_loop.py (tiny MLP, Adam) at K = 64: the eager sweep, its CUDA-graph
#    replay (plan={"cuda_graph": True}) and compile=True against the raw vmap(grad) step
timeout 240 "$py" benchmarks/models.py --device "${DEVICE:-cuda}" --models tiny-adam --k 64 \
    --impls loop,vmap,sweep,graph --compile --rounds 2 --no-memory \
    --json "$out/graph_gpu.json" --out "$out/graph_gpu.md" 2>&1 | tee "$out/graph_gpu.log"
