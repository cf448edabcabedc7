#!/usr/bin/env bash
# GPU readiness in one call (one H100/H200, under 8 minutes): every figure the GPU sections of bench/RESULTS.md
# need, appended to RESULTS (default bench/RESULTS.md) with the device and each command, then the test suite on
# the CUDA machine. Usage: bash bench/gpu_suite.sh [RESULTS_FILE]
#   1. the MoE layer at ViT-S/B/L FFN shapes, E=8 k=2, T=12,608 tokens (a ViT-B/16 batch of 64), bf16,
#      for the triton and the grouped dispatchers (target: whole layer fwd+bwd <= 1.3x ideal at ViT-B E8 k2)
#   1b. the sweep over E (4..128, ViT-B FFN, k 2) and fine-grained experts (E 64, k 8, H 384 each), every
#      dispatcher and transformers' experts side by side (target: <= 1.3x ideal at E8 k2 and at E64 k8)
#   2. whole training steps, dense vs upcycled E4 k2, ViT-S and ViT-B, bf16 (target: ViT-S >= 0.55x dense img/s)
#   3. `moe finetune` against a bare loop on the GPU
#   4. the NCCL smoke test: one torchrun process, FSDP2 over a group of one, bf16, 20 steps
#   5. pytest (Triton kernels on CUDA, not the interpreter), its summary line recorded
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-bench/RESULTS.md}
start=$(date +%s)
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
{
  echo
  echo "## GPU suite: $gpu, torch $(python -c 'import torch; print(torch.__version__)'), $(date -u +%Y-%m-%d)"
  echo
  echo "Command: \`bash bench/gpu_suite.sh\` (each table below names its own command)."
} >> "$RESULTS"
run() {  # a step, bounded in time; a failure is recorded and the suite goes on
  local limit=$1; shift
  echo "+ $*" >&2
  if ! timeout "$limit" "$@"; then
    printf '\n`%s` did not finish (exit or time-out after %ss)\n' "$*" "$limit" >> "$RESULTS"
  fi
}
for impl in triton grouped; do
  run 150 python bench/moe_layer.py --device cuda --dtype bf16 --shapes vit_s vit_b vit_l --experts 8 --k 2 \
    --routing balanced skewed --tokens 12608 --impl "$impl" --out "$RESULTS"
done
for impl in triton grouped; do  # the SwiGLU FFN of a 1-2B LLM (D 2048, H 8192), E 8 k 2
  run 90 python bench/moe_layer.py --device cuda --dtype bf16 --shapes llm_1b --experts 8 --k 2 \
    --routing balanced --tokens 8192 --impl "$impl" --out "$RESULTS"
done
run 120 python bench/moe_layer.py --sweep E --values 4 8 16 32 64 128 --device cuda --dtype bf16 --shapes vit_b \
  --tokens 12608 --out "$RESULTS"
run 60 python bench/moe_layer.py --sweep k --values 2 8 --experts 64 --hidden 384 --device cuda --dtype bf16 \
  --shapes vit_b --tokens 12608 --out "$RESULTS"
for model in vit_small_patch16_224 vit_base_patch16_224; do
  run 90 python bench/moe_layer.py --model "$model" --device cuda --dtype bf16 --batch 128 --experts 4 --k 2 \
    --steps 20 --out "$RESULTS"
done
run 90 python bench/loop_overhead.py --device cuda --precision bf16 --batch 256 --steps 300 --out "$RESULTS"
smoke="torchrun --nproc-per-node 1 -m moe_cli finetune recipes/digits-vit-tiny-dense.yaml --out /tmp/nccl-smoke \
  --overwrite --set train.parallel=fsdp --set train.precision=bf16 --set train.steps=20 --set train.eval_every=0"
if timeout 120 $smoke > /tmp/nccl-smoke.log 2>&1; then
  printf '\nNCCL smoke test (`%s`): passed; %s\n' "$smoke" "$(tail -1 /tmp/nccl-smoke.log)" >> "$RESULTS"
else
  printf '\nNCCL smoke test (`%s`): FAILED; %s\n' "$smoke" "$(tail -1 /tmp/nccl-smoke.log)" >> "$RESULTS"
fi
summary=$(timeout 240 python -m pytest -q -p no:cacheprovider 2>&1 | tail -1)
printf '\nTest suite on this GPU machine (`python -m pytest -q`): %s\n\nWhole suite: %ss.\n' \
  "$summary" "$(( $(date +%s) - start ))" >> "$RESULTS"
echo "$summary"
