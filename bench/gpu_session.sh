#!/usr/bin/env bash
# Every GPU measurement of bench/RESULTS.md in one go, on a machine with one CUDA GPU (H100 or H200):
#
#     OUT=/tmp/gpu bash bench/gpu_session.sh
#     OUT=/tmp/gpu PARTS="checks kernels" bash bench/gpu_session.sh        # some parts only
#
# 1. versions, the GPU, whether vLLM imports;
# 2. the Triton kernels against the PyTorch reference on the device (bench_topk_kl.py --check);
# 3. `opcd bench loss --preset paper`: the loss providers at the paper's shapes, written as the GPU's baseline
#    ($OUT/baseline-loss.json: commit it as bench/baselines/h100.json or h200.json);
# 4. `opcd bench step`: one training step, 1.7B-shaped student and 8B-shaped teacher, Triton and PyTorch loss;
#    then each objective (--objective, with and without the reward's term) beside the top-k reverse KL;
#    (bench_train_step.py, the research script, adds timed rollouts: PARTS="train-step");
# 5. `opcd distill` itself on the GPU: the toy world's default run, 30 steps, its --json summary;
# 6. the forward kernel alone at several launch configurations (bench_topk_kl.py --sweep).
# Each part has its own time limit, so a part that fails or hangs leaves the others' results. Liger-Kernel is
# installed from wheels in .whl/ when that folder exists (a machine without a package index).
set -u
OUT=${OUT:-bench/gpu-$(date +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/session.log"
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    $PY -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1
    $PY -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
} >"$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

PARTS=${PARTS:-checks bench-loss bench-step bench-objectives toy-distill sweep}
TRAIN_ARGS=${TRAIN_ARGS:-}

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log everything, report the exit status
    local name=$1 limit=$2
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return ;; esac
    echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
}

part checks 100 $PY bench/bench_topk_kl.py --check --no-shapes --out "$OUT/topk_kl_checks.json"
part bench-loss 200 $PY -m opcd_cli bench loss --preset paper --save-baseline "$OUT/baseline-loss.json" --json
part bench-step 150 $PY -m opcd_cli bench step --save-baseline "$OUT/baseline-step.json" --json
part bench-objectives 150 $PY -m opcd_cli bench step --kernel triton --steps 2 --objective topk-reverse-kl,sampled-token,topk-forward-kl,jsd --reward --json
part kernels 180 $PY bench/bench_topk_kl.py --reps 10 --out "$OUT/topk_kl_gpu.json"
part train-step 140 $PY bench/bench_train_step.py $TRAIN_ARGS --out "$OUT/train_step_gpu.json"
part toy-distill 75 $PY -m opcd_cli distill --steps 30 --json --output-dir /tmp/opcd-toy-gpu
part sweep 50 $PY bench/bench_topk_kl.py --sweep --no-shapes --out "$OUT/topk_kl_sweep.json"
grep -E "check |FAILED|floor|rollouts|step [0-9]|torch / triton|sweep|Error|error|student_no_context|regression|===|│" "$LOG" | tail -90
