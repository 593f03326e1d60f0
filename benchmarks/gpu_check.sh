#!/usr/bin/env bash
# One prepared GPU check, for a machine with a CUDA GPU, torch and pytest, but no internet.
#
#   cp -r ../shared/device-wheels .whl        # dask, distributed, zarr, numcodecs, rasterio + needs
#   bash benchmarks/gpu_check.sh [WHEEL_DIR] [REPORT]     (defaults: .whl, $OUT/gpu_report.json or ./gpu_report.json)
#
# Installs the carried wheels into /tmp/site, installs this project without dependencies, runs
# the gpu-marked tests, then measures bare-model tiles/s (fp32/bf16/fp16, channels_last, batch
# sizes) and end-to-end ingest tiles/s on a synthetic 16,384 x 16,384 GeoTIFF with 1, 4 and all-cores
# I/O threads feeding the GPU (reads overlap inference; the GPU takes one batch at a time), with
# the GPU utilization nvidia-smi samples during each run, then the same ingest with --mode dense
# (tiles/s against exact, and the cosine between the two modes' fingerprints); then
# benchmarks/gpu_profile.py --layouts (stage timers, the device thread against the old layout)
# and benchmarks/driver.py --now-only (small files against a large image with every core).
# About 9 minutes: run it with a timeout of 600 s; each step writes its report as it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
REPORT=${2:-${OUT:-.}/gpu_report.json}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>/dev/null \
  || echo "(editable install skipped; using PYTHONPATH=$PWD)"
python3 -c "import torch, dask, zarr, rasterio; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# only the modules that hold gpu tests: the others import packages a bare CUDA image lacks
# (fastapi, geopandas, playwright), and one collection error would stop the whole session;
# a failing GPU test is reported and the benchmark still runs
python3 -m pytest -q -m gpu tests/test_embed.py tests/test_dense.py -p no:cacheprovider || tests_rc=$?
python3 benchmarks/gpu_bench.py --device cuda --out "$REPORT"
# the device thread against threads taking turns, with stage timers (the full profile, with the
# read ceiling and one suspect at a time: gpu_profile.py without --layouts, ~4 minutes)
python3 benchmarks/gpu_profile.py --device cuda --layouts --out "$(dirname "$REPORT")/gpu_layouts.json"
# issue 10 on a many-core machine: whole-ingest windows/s of one large GeoTIFF against 10,000
# small GeoTIFF chips with every core (stand-in model, CPU only), beside the 2-core figures
cp benchmarks/driver.json "$(dirname "$REPORT")/driver_many_cores.json"
python3 benchmarks/driver.py --now-only --repeat 1 --workdir /tmp/aerial-search-driver \
  --out "$(dirname "$REPORT")/driver_many_cores.json"
echo "gpu tests exit status: ${tests_rc:-0}"
exit "${tests_rc:-0}"
