#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md "GPU" in one run, meant to take under 5 minutes on one card:
#   - the diffusers LoRA example's step (the reference) and the earlier hand-written steps;
#   - the project's Trainer on an SD-1.5-sized random UNet with cached latents and text states, bf16,
#     plain and PoGDiff, and one configuration per speed option (gradient checkpointing on / off,
#     channels-last, AdamW foreach / for-loop against the default fused, torch.compile), 8-bit AdamW
#     for 2 steps: s/step, ratio to the example, FLOP per step, share of the bf16 peak, peak memory,
#     share of rows running the neighbour pass;
#   - the Neighbours tab's sd15 preparation (pogdiff.method.prepare: CLIP + VAE on the GPU, neighbour table)
#     on tiny random SD parts, or on the pipeline folder in $POGDIFF_SD_PIPELINE.
# Writes results/gpu.json (after each configuration, so a run cut short keeps what it measured) and
# prints the table.
#
#   scripts/gpu_check.sh          on a CUDA machine
#   scripts/gpu_check.sh --tiny   anywhere: the same paths on a tiny random UNet, 1 step each, into a
#                                 temporary file (results/gpu.json is left alone); without CUDA the
#                                 torch.compile configurations are left out (compiling takes minutes on a CPU)
# $PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
tiny=0
case "${1:-}" in
  --tiny) tiny=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--tiny]" >&2; exit 2 ;;
esac
has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [[ $tiny == 0 && $has_cuda == 0 ]]; then
  echo "error: no CUDA device: scripts/gpu_check.sh measures on an NVIDIA GPU. Run it on a CUDA machine," \
       "or run 'scripts/gpu_check.sh --tiny' for the check of every path on tiny random parts." >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pipe=${POGDIFF_SD_PIPELINE:-}
if [[ -z $pipe ]]; then
  pipe=$("$PY" -m tests.fakes "$work/tiny-sd" | tail -n 1)
fi
if [[ $tiny == 1 ]]; then
  out=$work/gpu.json
  args=(--tiny --steps 1 --warmup 1 --batch-size 2)
  if [[ $has_cuda == 0 ]]; then
    configs=$("$PY" -c "from pogdiff.bench.gpu import TRAINER_CONFIGS as C
print('\n'.join(n for n, o in C.items() if not o.get('compile_unet')))")
    mapfile -t names <<< "$configs"
    args+=(--configs "${names[@]}")
  fi
else
  out=results/gpu.json
  args=(--batch-size 8 --steps 10 --warmup 3)
fi
start=$SECONDS
"$PY" -m pogdiff bench gpu "${args[@]}" --prepare-pipeline "$pipe" --out "$out" | grep -v '^{'
echo "written to $out in $((SECONDS - start)) s"
