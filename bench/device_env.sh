# Sourced by the device scripts (bench/device_check.sh, bench/device_render.sh) at the start of one call on a
# lent GPU machine: the wheels carried in .whl (packages that machine's image lacks: diffusers, pydantic, peft)
# installed beside its own, the repository on PYTHONPATH, $OUT made, and what the figures ran on printed.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 DO_NOT_TRACK=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "
import os
from importlib import metadata
names = ('torch', 'diffusers', 'transformers', 'peft', 'pydantic')
found = {n: metadata.version(n) for n in names if any(True for _ in metadata.distributions(name=n))}
print(' '.join(f'{n} {v}' for n, v in found.items()), 'cpus', os.cpu_count())"
