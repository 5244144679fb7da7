#!/usr/bin/env bash
# One GPU check of the Triton backend, for a lent CUDA machine: the cuda-marked tests with Triton's
# interpreter off, then the GPU attention benchmark. Run from the repository root with OUT set to an
# empty folder; everything it produces lands there (logs, JUnit XML, JSON, PNG). About 8 minutes at
# most: each stage has its own time limit, so a hang in one still leaves the others' results.
#
#   OUT=/tmp/out scripts/gpu_check.sh
set -u
: "${OUT:?set OUT to an empty output folder}"
mkdir -p "$OUT"
VENV=${VENV:-.venv-gpu}
BUDGET=${BUDGET:-470}  # seconds for the whole script
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/steps.log"; }
# a stage's time limit: its own cap, or what is left of the budget (at least 10 s)
limit() { local left=$((BUDGET - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 10 ? left : 10)) || echo "$1"; }

log "device"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"

if [ ! -x "$VENV/bin/python" ]; then
  log "venv: creating $VENV (torch from PyPI, its default CUDA build)"
  python3 -m venv "$VENV"
  # torch as pinned by constraints.txt: PyPI's Linux wheel of that version is a CUDA build
  timeout "$(limit 150)" "$VENV/bin/pip" install -q -c constraints.txt torch > "$OUT/pip.log" 2>&1 \
    || log "torch install failed"
  timeout "$(limit 100)" "$VENV/bin/pip" install -q -c constraints.txt -e ".[test,gpu]" >> "$OUT/pip.log" 2>&1 \
    || log "dashkv install failed"
fi
PY="$VENV/bin/python"
"$PY" - > "$OUT/versions.txt" 2>&1 <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("triton", triton.__version__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name())
EOF
cat "$OUT/versions.txt" | tee -a "$OUT/steps.log"

log "tests: -m cuda, interpreter off"
env -u TRITON_INTERPRET timeout "$(limit 150)" "$PY" -m pytest -q -m cuda tests/ops/test_triton_kernels.py \
  tests/ops/test_triton_step.py --junitxml="$OUT/tests.xml" -p no:cacheprovider > "$OUT/tests.log" 2>&1
log "tests exit code $? (tail below)"
tail -n 5 "$OUT/tests.log" | tee -a "$OUT/steps.log"

log "benchmark: bf16, batch 1 and 8, smollm2 and llama3-8b, 8K-512K keys"
env -u TRITON_INTERPRET timeout "$(limit 170)" "$PY" -m dashkv.bench.attention --device cuda \
  --shapes llama3-8b,smollm2 --sizes 8192,16384,32768,65536,131072,524288 --batches 1,8 --output "$OUT" > "$OUT/bench.log" 2>&1
log "benchmark exit code $?"
tail -n 40 "$OUT/bench.log" | tee -a "$OUT/steps.log"
ls -l "$OUT" | tee -a "$OUT/steps.log"
