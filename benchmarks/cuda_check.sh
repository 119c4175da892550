#!/usr/bin/env bash
# The CUDA checks in one call of the device tool, for a session that is lent a GPU:
#   bash benchmarks/cuda_check.sh          (there, from the repository root; at most 9 minutes: run it with timeout_s 600)
# It needs no install: the package is read from the working tree (PYTHONPATH), with the image's torch,
# torchvision, timm, Triton and pytest. Logs go to $OUT (the device tool brings them back), else ./cuda_check_out.
# Each part has its own time limit and they run in order of value, so a slow part leaves the others' logs:
#   1. the CUDA tests (the compiled Triton kernel, eager and compiled, against each other) and the same-numbers
#      rules and first-call check on the GPU;
#   2. what the Triton kernel's first-call check costs (per dtype, rank and mask variant);
#   3. the paired overhead of a compiled ResNet-50 train step (goal <= 3%);
#   4. the eager op against the elementwise floor (goals <= 2x the floor, <= 1 B/elem kept for backward);
#   5. the compiled op against the compiled peers and the floor.
# DEVICE=cpu ROUNDS=2 BATCH=2 SIZE=64 QUICK=--quick runs the same parts on CPU (a check of this script).
set -u -o pipefail
out=${OUT:-cuda_check_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
rounds=${ROUNDS:-20}
quick=${QUICK:-}
status=0
part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$out/$name.log"
    timeout "$limit" "$@" 2>&1 | grep -v '^W[0-9]\{4\} ' | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}
part env 30 "$py" -c "import torch, triton, torchvision, timm; print('torch', torch.__version__, 'triton', triton.__version__,
    'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available() and
    torch.cuda.get_device_name())"
if [ "$device" = cuda ]; then
    part tests 120 "$py" -m pytest -q -p no:cacheprovider -k cuda tests/test_ops_triton.py tests/test_ops_mask_op.py \
        tests/test_ops_compile.py tests/test_ops_rules.py tests/test_ops_dispatch.py
fi
part first_call 90 "$py" benchmarks/bench_op.py --device "$device" --first-call
part train_step 200 "$py" benchmarks/bench_train_step.py --device "$device" --compile --only "tv plain" "tv + dbi" \
    --batch "${BATCH:-64}" --size "${SIZE:-224}" --rounds "$rounds"
part op_eager 60 "$py" benchmarks/bench_op.py --device "$device" --rounds "$rounds" $quick
part op_compiled 130 "$py" benchmarks/bench_op.py --device "$device" --compile --rounds "$rounds" $quick
exit "$status"
