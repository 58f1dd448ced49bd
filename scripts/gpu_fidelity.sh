#!/usr/bin/env bash
# One prepared GPU session for issue 25 (run it from the repository root on a machine with a
# CUDA GPU, e.g. through the device tool; about 8-9 minutes on one H100):
#   1. the LoRA-A2 study on the GPU, four units at once, each with several clients in one pass
#      (results under $OUT/results/fidelity-gpu, the page section under $OUT/fidelity-gpu.md);
#   2. benchmarks/parallel_clients.py --device cuda: K = 1..16 clients in one pass, with its
#      equivalence check against sequential training (the many-clients issue's open figure);
#   3. benchmarks/client_step.py --device cuda: fedlora's step against plain peft's.
# Each part has its own time limit so a slow one cannot starve the next; what finished is kept.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_fidelity}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
timeout 330 fedlora reproduce lora_a2 --scale gpu --jobs 4 --threads 2 \
    --results "$OUT/results/fidelity-gpu" --doc "$OUT/fidelity-gpu.md" --runs "$OUT/runs" \
    > "$OUT/reproduce.log" 2>&1; echo "reproduce exit $?" >> "$OUT/reproduce.log"
timeout 120 python benchmarks/parallel_clients.py --device cuda --ks 1 2 4 8 16 --reps 3 \
    --steps 2 --check --json "$OUT/parallel_clients_cuda.json" > "$OUT/parallel_clients.log" 2>&1
timeout 60 python benchmarks/client_step.py --device cuda --reps 3 --curve-steps 0 \
    > "$OUT/client_step.log" 2>&1
tail -n 3 "$OUT"/*.log
