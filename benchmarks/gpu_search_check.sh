#!/usr/bin/env bash
# Issue 23's GPU check, one run of under 6 minutes on a CUDA machine with torch, Triton and pytest
# but no internet:
#
#   mkdir -p .whl && cp ../shared/device-wheels/*.whl .whl/     # dask, zarr, rasterio + needs (47 MB)
#   pip download --only-binary=:all: --no-deps --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     fastapi starlette pydantic pydantic_core annotated-types annotated-doc typing-inspection \
#     anyio idna uvicorn h11 python-multipart opentelemetry-api  # the HTTP API's wheels (~5 MB;
#                                                  # fastapi >= 0.16x needs opentelemetry-api)
#   bash benchmarks/gpu_search_check.sh [WHEEL_DIR] [OUT_DIR]   (defaults: .whl, $OUT or .)
#   (TESTS_S, BENCH_S: the tests' and the benchmark's time limits, 150 and 330 s; gpu_checks.sh
#   runs this and gpu_ingest_check.sh in one call with shorter ones)
#   (rehearse both checks here first, on the CPU: bash benchmarks/gpu_rehearsal.sh WHEEL_DIR DATA_DIR)
#
# Installs the wheels into /tmp/site, runs the gpu-marked tests of the device search (every
# scorer, filters, thresholds, codes and their re-rank, Hamming ties, the Triton popcount: CUDA
# against the NumPy engine), then benchmarks/gpu_search.py: 1e7 and 1e8 float16 fingerprints and
# 1e8 and 1e9 binary codes built on the GPU, 1 and 100 queries against a plain torch reference
# and the CPU engine on 2e6 rows, and GET /api/search on loopback over 1e7 and 1e8 device-held
# tiles (on a card too small for a size, e.g. an H100 for 1e8 float16, the largest that fits, marked
# capped_from: ask for an H200). Writes OUT_DIR/gpu_search.json (copy it to benchmarks/) and OUT_DIR/gpu_search_tests.log.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
OUTDIR=${2:-${OUT:-.}}
source benchmarks/gpu_env.sh "$WHEELS"
python3 -c "import torch, triton, dask, zarr, rasterio, fastapi, uvicorn; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'triton', triton.__version__)"
# the HTTP rows build the real app: a wheel it needs that did not travel fails here, in one line, not after the scans
python3 -c "from pipeline.serve.app import create_app; import fastapi; fastapi.FastAPI()"

# a failing GPU test is reported and the benchmark still runs
timeout "${TESTS_S:-150}" python3 -m pytest -q -m gpu tests/test_device_search.py -p no:cacheprovider 2>&1 \
  | tee "$OUTDIR/gpu_search_tests.log" || tests_rc=$?
timeout "${BENCH_S:-330}" python3 benchmarks/gpu_search.py --device cuda --http 10000000 100000000 --out "$OUTDIR/gpu_search.json"
echo "gpu tests exit status: ${tests_rc:-0}"
exit "${tests_rc:-0}"
