#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool), the exact script behind the README's render-overhead
# figures from a GPU machine: the render task against bare batched pipeline calls at SD1.5 512 px on the GPU
# (`python -m bench --gpu --only render-size`), then, with CUDA hidden, the CPU render suites on the tiny model
# (`python -m bench --only render,grid --threads 1`), one after the other so neither disturbs the other's
# timings. diffusers, pydantic and peft are not in that machine's image: their wheels travel in .whl (carry it).
# shellcheck source=bench/device_env.sh
source bench/device_env.sh
GPU_S=${GPU_S:-240}; CPU_S=${CPU_S:-260}
timeout "$GPU_S" python3 -m bench --gpu --only render-size --out "$OUT/gpu" > "$OUT/gpu.log" 2>&1
echo "gpu bench exit $?"
CUDA_VISIBLE_DEVICES="" timeout "$CPU_S" python3 -m bench --only render,grid --threads 1 --out "$OUT/cpu" \
  > "$OUT/cpu.log" 2>&1
echo "cpu bench exit $?"
grep -v "it/s\]" "$OUT/gpu.log" | tail -30
grep -v "it/s\]" "$OUT/cpu.log" | tail -40
