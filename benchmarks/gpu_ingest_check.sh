#!/usr/bin/env bash
# Issue 24's GPU check, one run of under 6 minutes on a CUDA machine with torch, torchvision
# (nvJPEG), tifffile and pytest but no internet:
#
#   mkdir -p .whl && cp ../shared/device-wheels/*.whl .whl/        # dask, zarr, rasterio + needs (47 MB)
#   python benchmarks/gpu_ingest.py --prepare ../shared/data --data .gpu-data   # ~10 MB of imagery + weights
#   bash benchmarks/gpu_ingest_check.sh [WHEEL_DIR] [DATA_DIR] [OUT_DIR]   (defaults: .whl, .gpu-data, $OUT or .)
#   (TESTS_S, BENCH_S: the tests' and the benchmark's time limits, 100 and 250 s)
#   (rehearse both checks here first, on the CPU: bash benchmarks/gpu_rehearsal.sh WHEEL_DIR DATA_DIR)
#
# Installs the wheels into /tmp/site, runs the gpu-marked tests of device decoding (nvJPEG against
# libjpeg-turbo: pixels and fingerprints), then benchmarks/gpu_ingest.py: the bare model in fp16,
# whole ingests of a 24,576 px JPEG GeoTIFF mosaic and its deflate twin (built here from the
# carried imagery) and 20,000 JPEG chips, each with the CPU decoder and --decoder device, exact
# and dense, and the fidelity of device-decoded fingerprints (SqueezeNet 1.1, ImageNet) on the
# carried JPEG GeoTIFFs and UC Merced subset. Writes OUT_DIR/gpu_ingest.json (copy it to
# benchmarks/) and OUT_DIR/gpu_ingest_tests.log.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
DATA=${2:-.gpu-data}
OUTDIR=${3:-${OUT:-.}}
source benchmarks/gpu_env.sh "$WHEELS"
python3 -c "import torch, torchvision, tifffile, dask, zarr, rasterio; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'torchvision', torchvision.__version__)"

timeout "${TESTS_S:-100}" python3 -m pytest -q -m gpu tests/test_device_decode.py -p no:cacheprovider 2>&1 \
  | tee "$OUTDIR/gpu_ingest_tests.log" || tests_rc=$?
weights=()
[ -f "$DATA/squeezenet1_1-imagenet.pth" ] && weights=(--weights "$DATA/squeezenet1_1-imagenet.pth")
timeout "${BENCH_S:-250}" python3 benchmarks/gpu_ingest.py --device cuda --data "$DATA" "${weights[@]}" --out "$OUTDIR/gpu_ingest.json"
echo "gpu tests exit status: ${tests_rc:-0}"
exit "${tests_rc:-0}"
