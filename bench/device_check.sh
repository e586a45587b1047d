#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): the GPU benchmark, then pretraining variants
# of the tiny world model in parallel. Results land in $OUT. diffusers is not in that machine's
# image, so its wheel travels in .whl (see bench/README or the issue notes).
# shellcheck source=bench/device_env.sh
source bench/device_env.sh

BENCH_S=${BENCH_S:-250}; PRETRAIN_S=${PRETRAIN_S:-290}
if [ "$BENCH_S" -gt 0 ]; then
  timeout "$BENCH_S" python3 -m bench --gpu --only gpu --out "$OUT/bench" > "$OUT/bench.log" 2>&1
  echo "bench exit $?"; tail -60 "$OUT/bench.log"
fi

common=(--device cuda --num-images 12000 --vae-steps 4000 --vae-batch 64 --vae-crop 64 --unet-batch 256
        --data-processes 4 --threads 2 --max-seconds $((PRETRAIN_S - 40)))
declare -A variants=(
  [a]="--unet-steps 8000 --unet-lr 1e-3 --text-lr 3e-3"
  [b]="--unet-steps 8000 --unet-lr 1e-3 --text-lr 3e-3 --offset-noise 0.1"
  [c]="--unet-steps 8000 --unet-lr 2e-3 --text-lr 5e-3 --ema-decay 0.999"
)
for v in "${!variants[@]}"; do
  # shellcheck disable=SC2086
  timeout "$PRETRAIN_S" python3 -m tasks.models.pretrain_tiny --out "/tmp/world-$v" "${common[@]}" ${variants[$v]} \
    > "/tmp/pretrain-$v.log" 2>&1 &
done
wait
for v in "${!variants[@]}"; do
  tail -4 "/tmp/pretrain-$v.log"
  if [ -f "/tmp/world-$v/pretrain.json" ]; then tar -C /tmp -cf "$OUT/world-$v.tar" "world-$v" "pretrain-$v.log"
  else cp "/tmp/pretrain-$v.log" "$OUT/"; fi
done
ls -la "$OUT"
