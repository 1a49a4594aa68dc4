#!/usr/bin/env bash
# Everything that needs a GPU, in one run of under 8 minutes on one CUDA device:
#   1. kernel tests        tests/engine/kernels/test_lora_kernel.py (interpreter and sm_90 compile checks)
#   2. attention tests     tests/engine/attention/test_attention.py (varlen flash on the GPU against the dense mask)
#   3. LoRA kernel bench   bench/lora_kernel.py (checks fused == loop first, then times both)
#   4. multitask bench     bench.multitask's GPU mode at N=1 and N=8: separate (padded),
#                          separate-packed (padding-free, varlen attention) and muxtune
# Usage: scripts/gpu-check.sh OUTDIR        (PYTHON=... to pick the interpreter)
# Writes OUTDIR/summary.json (each step's exit code, seconds, log), OUTDIR/*.log, the tests' JUnit
# XML, lora_kernel.json and multitask.json. Exit 0 when every step passed, 1 when one failed,
# 2 without a CUDA device (nothing runs) or without OUTDIR.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu-check.sh OUTDIR" >&2
    exit 2
fi
OUT="$1"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="python3"; fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: no CUDA device is visible to $PY (torch.cuda.is_available() is False); nothing was run." >&2
    echo "gpu-check: run this on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
export MUXTUNE_HOME="${MUXTUNE_HOME:-$OUT/muxtune-home}"  # generated models (a 1.1B Llama for the bench)
STEPS=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, record
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    echo "gpu-check: $name ..." >&2
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    STEPS+=("$name $rc $((SECONDS - t0))")
    echo "gpu-check: $name exit $rc in $((SECONDS - t0))s" >&2
}

# (budget: 8 minutes in all on an H100/H200; each limit leaves the rest a share)
step kernel-tests 150 "$PY" -m pytest tests/engine/kernels/test_lora_kernel.py -q -x -p no:cacheprovider \
    --junitxml="$OUT/kernel-tests.xml"
step attention-tests 90 "$PY" -m pytest tests/engine/attention/test_attention.py -q -p no:cacheprovider \
    --junitxml="$OUT/attention-tests.xml"
step lora-kernel-bench 60 "$PY" -m bench.lora_kernel --tasks 1,8 --hidden 2048,4096 --tokens 4096,16384 \
    --warmup 3 --iters 10 --json "$OUT/lora_kernel.json"
step multitask-bench 170 "$PY" -m bench.multitask --device cuda --n 1 8 \
    --systems separate separate-packed muxtune --steps 6 --warmup-steps 2 --repeats 1 --timeout 150 \
    --json "$OUT/multitask.json"

"$PY" - "$OUT" "${STEPS[@]}" <<'EOF'
import json, subprocess, sys
out, steps = sys.argv[1], sys.argv[2:]
import torch
rows = [dict(zip(("step", "exit_code", "seconds"), (s.split()[0], int(s.split()[1]), int(s.split()[2]))), log=f"{s.split()[0]}.log")
        for s in steps]
summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "git": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "passed": all(r["exit_code"] == 0 for r in rows), "steps": rows}
with open(f"{out}/summary.json", "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
EOF
for s in "${STEPS[@]}"; do
    set -- $s
    [ "$2" -eq 0 ] || exit 1
done
exit 0
