#!/usr/bin/env bash
# One device call's work on a GPU machine (the `device` tool), after the wheel kit was staged:
#   bash benchmarks/gpu_session.sh install smoke sync rollout      (any stages, in order)
# Stages: install (kit → /tmp/site), smoke (echoink train, ZeRO-2 then ZeRO-3), sync, rollout,
# learner7b, learner2b, async, colocated3b, colocated7b, everyinput, and "what fits" (RESULTS.md
# section 9): full3b, lora3b, lora7b, lora3b80, lora7b80 (80 GB simulated: the learner capped
# at 76 GiB, the engine's share scaled to the same bytes as on an 80 GB card); the full fine-tune's
# levers (section 10): cpuadam (DeepSpeed's CPU Adam builds), full3b80off, full7blean, full7boff; learner speed (section 11): learner3b (the yardstick, the breakdown and before/after arms),
# rollout7bhf (bare vLLM, ours and transformers generate); Qwen3-Omni-30B-A3B (section 12): rollout30b, lora30b. Logs and JSON records go to $OUT; a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/echoink-out} PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
export PYTHONPATH=$PWD:/tmp/site ECHOINK_BENCH_DIR=/tmp/echoink-bench RAY_DEDUP_LOGS=0
mkdir -p "$OUT"
PY=python3
summary=()
run() {  # name, command...
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-12s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  grep -E "^(==|[a-zA-Z].*  )" "$OUT/$name.log" | tail -8
  [ $rc -ne 0 ] && tail -30 "$OUT/$name.log"
  return 0
}
for stage in "$@"; do
  case $stage in
    install)
      run install bash -c 'bash .kit/install.sh && python3 -c "import vllm, ray, deepspeed, transformers, torch; print(\"versions\", vllm.__version__, ray.__version__, deepspeed.__version__, transformers.__version__, torch.__version__, torch.cuda.device_count())"' ;;
    smoke)
      $PY -m echoink.cli model tiny --layout small --out checkpoints/small-omni > "$OUT/smoke-prep.log" 2>&1
      $PY -m echoink.cli data synth --out data/gpu-synth --train 64 --val 16 --image-size 224 --audio-seconds 4 >> "$OUT/smoke-prep.log" 2>&1
      run smoke-z2 $PY -m echoink.cli train --config configs/gpu_smoke.yaml
      run smoke-z3 $PY -m echoink.cli train --config configs/gpu_smoke.yaml --set learner.zero_stage=3 --set output_dir=runs/gpu-smoke-z3
      cp runs/gpu-smoke/metrics.jsonl "$OUT/smoke-z2-metrics.jsonl" 2>/dev/null ;;
    sync) run sync $PY benchmarks/bench_weight_sync.py --layout 7b ;;
    rollout) run rollout $PY benchmarks/bench_rollout.py --layout 7b ;;
    learner7b) run learner7b $PY benchmarks/bench_learner.py --layout 7b --ranks 2 ;;
    learner2b) run learner2b $PY benchmarks/bench_learner.py --layout 2b --ranks 1 ;;
    async) run async $PY benchmarks/bench_async.py --layout 2b ;;
    colocated3b) run colocated3b $PY benchmarks/bench_colocated.py --layout 3b --steps 4 ;;
    everyinput) run everyinput $PY benchmarks/bench_every_input.py --layout 2b ;;
    colocated7b) run colocated7b $PY benchmarks/bench_colocated.py --layout 7b --config configs/omni7b_1gpu.yaml --steps 4 ;;
    full3b) run full3b $PY benchmarks/bench_colocated.py --layout 3b --steps 3 --tag full ;;
    lora3b) run lora3b $PY benchmarks/bench_colocated.py --layout 3b --config configs/omni3b_80gb.yaml --steps 3 \
        --tag lora64 --set rollout.memory_share=0.35 ;;
    lora7b) run lora7b $PY benchmarks/bench_colocated.py --layout 7b --config configs/omni7b_1gpu.yaml --steps 3 --tag lora64 ;;
    lora3b80) run lora3b80 $PY benchmarks/bench_colocated.py --layout 3b --config configs/omni3b_80gb.yaml --steps 3 \
        --tag lora64_80gb --set learner.max_gpu_memory_gb=76 --set rollout.memory_share=$(awk 'BEGIN{print 0.45*80/139.8}') ;;
    lora7b80) run lora7b80 $PY benchmarks/bench_colocated.py --layout 7b --config configs/omni7b_lora_80gb.yaml --steps 3 \
        --tag lora64_80gb --set learner.max_gpu_memory_gb=76 --set rollout.memory_share=$(awk 'BEGIN{print 0.5*80/139.8}') ;;
    cpuadam) run cpuadam $PY -c "import time; t = time.time(); from deepspeed.ops.op_builder.cpu import CPUAdamBuilder; CPUAdamBuilder().load(); print(f'cpu_adam  built and loaded in {time.time() - t:.0f} s')" ;;
    full3b80off) run full3b80off $PY benchmarks/bench_colocated.py --layout 3b --config configs/omni3b_80gb.yaml --steps 3 \
        --tag full_offload_80gb --set learner.lora.rank=0 --set learner.lr=1e-6 --set learner.offload_optimizer=true \
        --set learner.max_gpu_memory_gb=76 --set rollout.memory_share=$(awk 'BEGIN{print 0.45*80/139.8}') ;;
    full7blean) run full7blean $PY benchmarks/bench_colocated.py --layout 7b --config configs/omni7b_1gpu.yaml --steps 3 \
        --tag full_bf16_refcpu --set learner.lora.rank=0 --set learner.lr=1e-6 --set learner.optimizer_dtype=bfloat16 \
        --set learner.reference_device=cpu ;;
    full7boff) run full7boff $PY benchmarks/bench_colocated.py --layout 7b --config configs/omni7b_1gpu.yaml --steps 3 \
        --tag full_offload_bf16 --set learner.lora.rank=0 --set learner.lr=1e-6 --set learner.optimizer_dtype=bfloat16 \
        --set learner.offload_optimizer=true ;;
    learner3bfused) run learner3bfused $PY benchmarks/bench_learner.py --layout 3b --ranks 1 --zero-stage 2 \
        --micro-batch 16 --sequences-per-gpu 32 --steps 2 --no-unshared --arm fused_head=true ;;
    learner3b) run learner3b $PY benchmarks/bench_learner.py --layout 3b --ranks 1 --zero-stage 2 \
        --micro-batch 16 --sequences-per-gpu 32 --steps 2 --breakdown \
        --arm tower_attention=per_window ;;
    rollout7bhf) run rollout7bhf $PY benchmarks/bench_rollout.py --layout 7b --repeats 2 --hf-questions 1 ;;
    rollout30b) run rollout30b $PY benchmarks/bench_rollout.py --layout qwen3-30b-a3b --repeats 2 --hf-questions 0 ;;
    lora30b) run lora30b $PY benchmarks/bench_colocated.py --layout qwen3-30b-a3b \
        --config configs/qwen3_omni_30b_lora_1gpu.yaml --steps 2 --tag lora64 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  ray stop --force > /dev/null 2>&1
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sed 's/^/gpu: /'
printf '%s\n' "${summary[@]}"
