#!/usr/bin/env bash
# GPU readiness in one device call (one H100/H200): the CUDA tests, then every figure the GPU sections of
# bench/RESULTS.md need, each table appended to RESULTS with the device and its command, then the whole test
# suite on the CUDA machine. The steps run in this order, each bounded by its own limit and by what is left of
# SUITE_SECONDS (default 540, so that the whole call fits a 600 s device command):
#   1. the CUDA tests, up to 150 s with the Triton kernels' first compilations and autotuning
#      (tests/moe/test_cuda.py: the grouped bf16 plan on F.grouped_mm, Triton in bf16 and fp32, auto's choice, a
#      bf16 finetune on the GPU; tests/moe/test_triton.py on CUDA, not the interpreter)
#   2. the MoE layer at ViT-S/B/L FFN shapes, E=8 k=2, T=12,608 tokens (a ViT-B/16 batch of 64), bf16, for the
#      triton and grouped dispatchers (target: whole layer fwd+bwd <= 1.3x ideal at ViT-B E8 k2)
#   3. the sweep over E (4..128, ViT-B FFN, k 2) and fine-grained experts (E 64, k 2 and 8, H 384 each), every
#      dispatcher and transformers' experts side by side (target: <= 1.3x ideal at E8 k2 and at E64 k8)
#   4. the SwiGLU FFN of a 1-2B LLM (D 2048, H 8192), E 8 k 2, triton and grouped
#   5. whole training steps, dense vs upcycled E4 k2, ViT-S and ViT-B, bf16 (target: ViT-S >= 0.55x dense img/s)
#   6. `moe finetune` against a bare loop on the GPU
#   7. the NCCL smoke test: one torchrun process, FSDP2 over a group of one, bf16, 20 steps
#   8. the whole test suite, its summary line recorded (full log beside RESULTS)
#
# With the device tool, from a session that has a GPU lent (the device image has its own torch; nothing can be
# downloaded there):
#   here:   bash bench/gpu_wheels.sh          # the Python packages the image lacks, as wheels in .whl/
#   device: run(command='bash bench/gpu_suite.sh "$OUT/gpu.md"', carry=[".whl"], timeout_s=600)
# then copy the tables of gpu.md into bench/RESULTS.md ("GPU" section); the logs (gpu-suite.log: all output;
# gpu-cuda-tests.log, gpu-nccl-smoke.log, gpu-pytest.log) come back beside it.
# Usage: bash bench/gpu_suite.sh [RESULTS_FILE]   (PYTHON=... to pick the interpreter; default python3;
# SUITE_DEVICE=cpu SUITE_SECONDS=60 rehearses the plumbing on a machine without a GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-bench/RESULTS.md}
LOGDIR=$(dirname "$RESULTS")
BUDGET=${SUITE_SECONDS:-540}
PY=${PYTHON:-python3}
DEV=${SUITE_DEVICE:-cuda}
start=$(date +%s)
rm -f "$LOGDIR"/gpu-*.log
exec > >(tee -a "$LOGDIR/gpu-suite.log") 2>&1  # everything the steps print, errors included, comes back too
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # moe_cli from this checkout, installed or not
if compgen -G ".whl/*.whl" > /dev/null; then  # packages the image lacks (bench/gpu_wheels.sh)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
versions=$("$PY" -c "
import importlib, torch
def version(name):
    try:
        return importlib.import_module(name).__version__
    except ImportError:
        return 'absent'
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'
print(gpu, '| torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
      ', '.join(f'{n} {version(n)}' for n in ('triton', 'timm', 'transformers')))")
{
  echo
  echo "## GPU suite: $versions, $(date -u +%Y-%m-%d)"
  echo
  echo "Command: \`bash bench/gpu_suite.sh\` (each table below names its own command)."
} >> "$RESULTS"
echo "$versions"
run() {  # a step, bounded by its own limit and the suite's budget; a failure is recorded and the suite goes on
  local limit=$1; shift
  local left=$(( BUDGET - ($(date +%s) - start) - 5 ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then
    printf '\n`%s` not run: the suite'"'"'s %ss were spent\n' "$*" "$BUDGET" >> "$RESULTS"
    return
  fi
  echo "+ [$(( $(date +%s) - start ))s] $*" >&2
  timeout "$limit" "$@"
  local rc=$?
  if (( rc == 124 )); then
    printf '\n`%s` cut after %ss\n' "$*" "$limit" >> "$RESULTS"
  elif (( rc != 0 )); then
    printf '\n`%s` failed (exit %s; its error is in gpu-suite.log)\n' "$*" "$rc" >> "$RESULTS"
  fi
}
pytest_line() {  # a pytest run whose summary line goes into RESULTS and whose log goes beside it
  local limit=$1 name=$2; shift 2
  run "$limit" bash -c "\"$PY\" -m pytest -q -p no:cacheprovider $* > \"$LOGDIR/$name.log\" 2>&1"
  [ -f "$LOGDIR/$name.log" ] && printf '\n`python -m pytest -q %s` on this GPU machine: %s\n' "$*" \
    "$(tail -1 "$LOGDIR/$name.log")" >> "$RESULTS"
}
pytest_line 150 gpu-cuda-tests -n 0 tests/moe/test_cuda.py tests/moe/test_triton.py
layer() { run "$1" "$PY" bench/moe_layer.py --device "$DEV" --dtype bf16 --out "$RESULTS" "${@:2}"; }
for impl in triton grouped; do
  layer 70 --shapes vit_s vit_b vit_l --experts 8 --k 2 --routing balanced skewed --tokens 12608 --impl "$impl"
done
layer 80 --sweep E --values 4 8 16 32 64 128 --shapes vit_b --tokens 12608
layer 40 --sweep k --values 2 8 --experts 64 --hidden 384 --shapes vit_b --tokens 12608
for impl in triton grouped; do  # the SwiGLU FFN of a 1-2B LLM (D 2048, H 8192), E 8 k 2
  layer 40 --shapes llm_1b --experts 8 --k 2 --routing balanced --tokens 8192 --impl "$impl"
done
for model in vit_small_patch16_224 vit_base_patch16_224; do
  layer 50 --model "$model" --batch 128 --experts 4 --k 2 --steps 20
done
run 50 "$PY" bench/loop_overhead.py --device "$DEV" --precision bf16 --batch 256 --steps 300 --out "$RESULTS"
smoke="$PY -m torch.distributed.run --nproc-per-node 1 -m moe_cli finetune recipes/digits-vit-tiny-dense.yaml \
  --out /tmp/nccl-smoke --overwrite --set train.parallel=fsdp --set train.precision=bf16 --set train.steps=20 \
  --set train.eval_every=0"
rm -rf /tmp/nccl-smoke
run 60 bash -c "$smoke > \"$LOGDIR/gpu-nccl-smoke.log\" 2>&1"
if [ -f "$LOGDIR/gpu-nccl-smoke.log" ]; then
  verdict=FAILED
  [ -d /tmp/nccl-smoke/final ] && verdict=passed  # the run's last act is writing final/
  printf '\nNCCL smoke test (`%s`): %s; %s\n' "$smoke" "$verdict" "$(tail -1 "$LOGDIR/gpu-nccl-smoke.log")" \
    >> "$RESULTS"
fi
pytest_line 240 gpu-pytest -n 8
printf '\nWhole suite: %ss.\n' "$(( $(date +%s) - start ))" >> "$RESULTS"
tail -3 "$RESULTS"
