#!/usr/bin/env bash
# The GPU check for the Triton kernels, in one run (about 9.5 minutes at most on an H100/H200):
#   1. the kernel and Triton-engine tests, natively (TRITON_INTERPRET=0);
#   2. bench/kernels.py: paged attention vs a copy and SDPA, quantized matmuls vs cuBLAS;
#   3. bench/decode_roofline.py: 8B-shaped batch-1 decode vs the memory roofline;
#   4. bench/chunked_prefill.py on the GPU: decoders' p99 ITL while a long prompt prefills
#      (random-weight 110M model built in /tmp; needs transformers, which the GPU image has).
# Results (JSON, logs, PNG) go to $OUT, else bench/results/gpu. Needs torch + triton + pytest
# (+ transformers for the engine test); installs nothing.
#     bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CONVEYOR_NATIVE_CPU=0
PY=${PYTHON:-python3}
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.txt"

# Compiling many kernel variants dominates the tests: spread them over workers when xdist is there.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 220 $PY -m pytest -q -p no:cacheprovider $XDIST \
    tests/test_triton_attention.py tests/test_triton_fused.py tests/test_quant_kernels.py \
    tests/test_triton_engine.py --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
tests=$?
timeout 90 $PY bench/kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
kern=$?
timeout 130 $PY bench/decode_roofline.py --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log"
dec=$?
timeout 120 $PY bench/chunked_prefill.py --device cuda --model-dir /tmp/conveyor-benchmodel \
    --chunk-budgets 512 256 --prefill-caps --out "$OUT/chunked_prefill.json" 2>&1 \
    | tee "$OUT/chunked_prefill.log"
chunk=$?
echo "exit codes: tests=$tests kernels=$kern decode=$dec chunked=$chunk" | tee -a "$OUT/env.txt"
exit $(( tests || kern || dec || chunk ))
