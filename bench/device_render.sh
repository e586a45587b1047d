#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool), the exact script behind the README's render-overhead
# figures from a GPU machine: the render task against bare batched pipeline calls at SD1.5 512 px on the GPU
# (`python -m bench --gpu --only render-size`), then, with CUDA hidden, the CPU render suites on the tiny model
# (`python -m bench --only render,grid --threads 1`), one after the other so neither disturbs the other's
# timings. diffusers, pydantic and peft are not in that machine's image: their wheels travel in .whl (carry it).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 DO_NOT_TRACK=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers, peft, pydantic; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cpus', __import__('os').cpu_count())"
GPU_S=${GPU_S:-240}; CPU_S=${CPU_S:-260}
timeout "$GPU_S" python3 -m bench --gpu --only render-size --out "$OUT/gpu" > "$OUT/gpu.log" 2>&1
echo "gpu bench exit $?"
CUDA_VISIBLE_DEVICES="" timeout "$CPU_S" python3 -m bench --only render,grid --threads 1 --out "$OUT/cpu" \
  > "$OUT/cpu.log" 2>&1
echo "cpu bench exit $?"
grep -v "it/s\]" "$OUT/gpu.log" | tail -30
grep -v "it/s\]" "$OUT/cpu.log" | tail -40
