#!/usr/bin/env bash
# One call on a lent GPU machine, from the repository root: the checks a session runs first, each with its own
# time limit and its whole log kept under $OUT (or ./device-out), so that one slow step cannot take the others' time
# or their output with it. The peers' wheels (bitsandbytes, liger-kernel), where `.whl/` holds them
# (`bash ../shared/gpu/fetch-peer-wheels.sh` on the development machine; carry ".whl"), go into `.peers/`.
#
#   bash benchmarks/device_run.sh STEP[:SECONDS] ...
#
# Steps: cuda-tests (pytest -m cuda), epilogue (adapter_epilogue.py), step (qlora_step.py, eager: floor and the
# alignlab / PEFT default rows, batch 1 and 4), step-compiled (the same, compiled, alignlab rows), lora (lora.py),
# nf4 (nf4.py --graphs --quick), tune-alt (nf4_tune.py --kernels swap_early swap, M = 2..64: the table entries of
# the swapped kernels for this GPU), tune-kv (the same at the 1024-row k / v shapes), nf4-ab (nf4_knob_ab.py: TABLE_REGS 0/1/auto), lookup-first (nf4_knob_ab.py
# --knob LOOKUP_FIRST for the two swapped kernels, forced to 4 warps: where the option applies), generate (nf4_generate.py),
# generate-tuned (the same with the entries of this call's tune-kv run added to the GPU's table, --tune-rows, and
# --host-profile: each contestant's host work per decode step under cProfile), generate-all (nf4_generate.py --graphs
# --adapters: eager and CUDA-graph generate of every contestant, QLoRA policies included, and --kernel-profile of the
# graphs mode at batch 32), generate-interleaved (the graphs mode, bf16 / alignlab NF4 / alignlab QLoRA timed in turn,
# --interleave 8),
# dora-norm (dora_norm.py: QDoRA's row norm with the input-dimension split off / on), dy-pass (lora_dy_pass.py: the
# backward's two rank-r products of dy, two GEMMs against one read), dy-sweep (the same with --sweep: rank_grads'
# launch configurations), rank-update (rank_update.py --sweep: the rank-r update into the base product, addmm_ against
# lora_gemm.rank_update_ and its launch configurations). Default limits in
# seconds below; `step:300` overrides one.
set -uo pipefail
export PYTHONUNBUFFERED=1
steps="cuda-tests epilogue step step-compiled lora nf4 tune-alt tune-kv nf4-ab lookup-first generate generate-tuned generate-all generate-interleaved dora-norm dy-pass dy-sweep rank-update"
for arg in "$@"; do  # every step name checked before anything is installed or written
  case " $steps " in
    *" ${arg%%:*} "*) ;;
    *) echo "unknown step '${arg%%:*}' (${steps// /, })" >&2; exit 2 ;;
  esac
done
out="${OUT:-device-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .peers .whl/*.whl
fi
# the repository first, then the peers: the library is imported from this checkout, never an installed copy
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:$PWD/.peers"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"

declare -A limit=([cuda-tests]=300 [epilogue]=90 [step]=200 [step-compiled]=300 [lora]=120 [nf4]=200
                  [nf4-ab]=150 [tune-alt]=480 [tune-kv]=240 [lookup-first]=200 [generate]=300 [generate-tuned]=300 [generate-all]=420 [generate-interleaved]=240
                  [dora-norm]=120
                  [dy-pass]=90 [dy-sweep]=420 [rank-update]=240)
run_step() {
  local name="$1" seconds="$2"
  shift 2
  echo "=== $name (limit ${seconds} s): $*"
  local t0=$SECONDS
  timeout "$seconds" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (time limit)')"
}

for arg in "$@"; do
  name="${arg%%:*}"
  seconds="${arg#*:}"
  [ "$seconds" = "$arg" ] && seconds="${limit[$name]:-}"
  case "$name" in
    cuda-tests) run_step "$name" "$seconds" python -m pytest -m cuda -v -p no:cacheprovider --durations=15 ;;
    epilogue) run_step "$name" "$seconds" python benchmarks/adapter_epilogue.py --out "$out/adapter_epilogue.json" ;;
    step) run_step "$name" "$seconds" python benchmarks/qlora_step.py --which floor defaults --batches 1 4 \
            --out "$out/qlora_step.json" ;;
    step-compiled) run_step "$name" "$seconds" python benchmarks/qlora_step.py --only-compile \
                     --which floor "alignlab QLoRA, defaults" "alignlab QDoRA, defaults" --batches 1 4 \
                     --out "$out/qlora_step_compiled.json" ;;
    lora) run_step "$name" "$seconds" python benchmarks/lora.py --out "$out/lora.json" ;;
    nf4) run_step "$name" "$seconds" python benchmarks/nf4.py --graphs --quick --out "$out/nf4.json" ;;
    tune-alt) run_step "$name" "$seconds" python benchmarks/nf4_tune.py --kernels swap_early swap --ms 2 4 8 16 32 64 \
                --deadline $((seconds - 60)) --out "$out/nf4_tune_alt.json" ;;
    tune-kv) run_step "$name" "$seconds" python benchmarks/nf4_tune.py --kernels swap_early swap \
               --shapes 1024x4096,1024x8192 --ms 2 4 8 16 32 64 --deadline $((seconds - 60)) \
               --out "$out/nf4_tune_kv.json" ;;
    lookup-first) run_step "$name" "$seconds" bash -c "python benchmarks/nf4_knob_ab.py --knob LOOKUP_FIRST \
                    --kernel swap_early --num-warps 4 --ms 2,16,32,64 --out '$out/lookup_first_swap_early.json' && \
                    python benchmarks/nf4_knob_ab.py --knob LOOKUP_FIRST --kernel swap --num-warps 4 --ms 2,16,32,64 \
                    --out '$out/lookup_first_swap.json'" ;;
    nf4-ab) run_step "$name" "$seconds" python benchmarks/nf4_knob_ab.py --out "$out/nf4_knob_ab.json" ;;
    generate) run_step "$name" "$seconds" python benchmarks/nf4_generate.py --out "$out/nf4_generate.json" ;;
    generate-tuned) run_step "$name" "$seconds" python benchmarks/nf4_generate.py --tune-rows "$out/nf4_tune_kv.json" --host-profile \
                      --out "$out/nf4_generate_tuned.json" ;;
    generate-all) run_step "$name" "$seconds" python benchmarks/nf4_generate.py --graphs --adapters --kernel-profile \
                    --out "$out/nf4_generate_all.json" ;;
    generate-interleaved) run_step "$name" "$seconds" python benchmarks/nf4_generate.py --only-graphs --adapters \
                            --which bf16 "alignlab NF4" "alignlab QLoRA" --interleave 8 \
                            --out "$out/nf4_generate_interleaved.json" ;;
    dora-norm) run_step "$name" "$seconds" python benchmarks/dora_norm.py --out "$out/dora_norm.json" ;;
    dy-pass) run_step "$name" "$seconds" python benchmarks/lora_dy_pass.py --out "$out/lora_dy_pass.json" ;;
    dy-sweep) run_step "$name" "$seconds" python benchmarks/lora_dy_pass.py --sweep --deadline $((seconds - 60)) --out "$out/lora_dy_sweep.json" ;;
    rank-update) run_step "$name" "$seconds" python benchmarks/rank_update.py --sweep --deadline $((seconds - 90)) \
                   --out "$out/rank_update.json" ;;
  esac  # (unknown names were refused above, before anything ran)
done
