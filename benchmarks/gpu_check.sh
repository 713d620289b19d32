#!/usr/bin/env bash
# The prepared GPU check (issue 13, point 5): run it whenever a CUDA machine is at hand and put
# its figures in the README ("GPUs"). Under 10 minutes. From the repository root:
#
#   bash benchmarks/gpu_check.sh              # install if needed, then the checks, on CUDA
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the same steps, tiny, on the CPU (tests the script)
#
# Steps, each with its own time limit, each printing its figures:
#   1. a Python whose torch sees CUDA: $PY if set; else .venv-cuda, else .venv if its torch has
#      CUDA; else `make setup VENV=.venv-cuda TORCH_INDEX=$TORCH_INDEX` (needs the network);
#   2. torch.cuda.is_available(), the device's name, the CUDA tests (tests/privacy/test_fused_clip.py);
#   3. the DP-SGD step benchmark on cuda (benchmarks/dp_overhead.py --device cuda);
#   4. `fedcore simulate`, 100 synthetic sites, client_gpus=0.25 (four sites per GPU), 3 rounds,
#      without and with record-level DP (dp.site.epsilon=8): wall seconds, seconds per round,
#      final accuracy.
# Time limits per step: install 180 s, tests 60 s, benchmark 90 s, simulations 120 s and 150 s
# (at most 10 minutes in all; a step that runs over stops the script with status 124).
# Exit status: 0 all ran; 2 no CUDA device; 3 install failed; other: the failing step's.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=1; fi
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/fedcore-gpu-check.XXXXXX")}"
export FLWR_TELEMETRY_ENABLED=0
START=$SECONDS

say() { printf '\n== %s (t=%ss)\n' "$*" "$((SECONDS - START))"; }
has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

say "1. a Python with CUDA torch"
if [[ -n "${PY:-}" ]]; then
    :
elif [[ -x .venv-cuda/bin/python ]]; then
    PY=.venv-cuda/bin/python
elif [[ -x .venv/bin/python ]] && has_cuda .venv/bin/python; then
    PY=.venv/bin/python
elif [[ $SMOKE == 1 ]]; then
    PY="$(command -v python3)"
else
    echo "installing torch from $TORCH_INDEX into .venv-cuda (make setup; .venv is left alone)"
    if ! timeout 180 make setup VENV=.venv-cuda TORCH_INDEX="$TORCH_INDEX"; then
        echo "gpu_check: installing a CUDA build of torch failed or took over 180 s." >&2
        echo "  Without network access, point PY at a Python with fedcore and CUDA torch." >&2
        exit 3
    fi
    PY=.venv-cuda/bin/python
fi
echo "python: $PY"

DEVICE=cuda SITES=100 ROUNDS=3 GPUS=0.25
if [[ $SMOKE == 1 ]]; then
    DEVICE=cpu SITES=4 ROUNDS=1 GPUS=0.0
elif ! has_cuda "$PY"; then
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA build:", torch.version.cuda)' || true
    echo "gpu_check: torch.cuda.is_available() is False for $PY: no usable CUDA device or driver." >&2
    echo "  Nothing was measured. Check nvidia-smi and that torch is a CUDA build." >&2
    exit 2
fi

say "2. device and CUDA tests"
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)")
EOF
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/privacy/test_fused_clip.py -k "cuda or equals_opacus" -rs

say "3. DP-SGD step benchmark on $DEVICE"
timeout 90 "$PY" benchmarks/dp_overhead.py --device "$DEVICE" --steps 50 --repeats 3

run_sim() {  # $1: label, $2: time limit in seconds, then extra --set arguments
    local label=$1 limit=$2
    shift 2
    local dir="$OUT/$label"
    say "4. simulate: $label ($SITES sites, $ROUNDS rounds, device $DEVICE, client_gpus $GPUS)"
    local t0=$SECONDS
    timeout "$limit" "$PY" -m fedcore.cli simulate --out "$dir" \
        --set sites="$SITES" --set rounds="$ROUNDS" --set device="$DEVICE" \
        --set client_gpus="$GPUS" --set local_epochs=1 \
        --set dataset=synthetic --set synthetic.samples=20000 "$@" | tail -n 3
    echo "wall seconds: $((SECONDS - t0))"
    "$PY" - "$dir/history.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print(f"round {r['round']}: {r['seconds']:.1f} s, accuracy {r['eval_accuracy']}, "
          f"sites replied {r.get('sites_replied', '(operator.jsonl)')}")
EOF
}

run_sim no-dp 120
# A fixed noise multiplier: the check is about training on the GPU, not about calibration.
run_sim record-dp 150 --set dp.site.epsilon=8 --set dp.site.noise_multiplier=1.0

say "done: run records under $OUT"
