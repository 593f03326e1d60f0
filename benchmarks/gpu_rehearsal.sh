#!/usr/bin/env bash
# A dress rehearsal of the GPU checks on this (CPU) machine, before a GPU machine's scarce minutes:
# a fresh venv holding only the packages of the GPU machine's image that this project touches
# (its image lists them: /work/.library/device/KINDS.md) plus the wheels a GPU run carries, then
# the CPU smoke runs of gpu_search.py and gpu_ingest.py and the collection of the gpu-marked
# tests, with this checkout on PYTHONPATH as benchmarks/gpu_env.sh puts it there. A wheel that
# does not travel shows up here as an ImportError or an "error" row, not on the GPU machine.
#
#   bash benchmarks/gpu_rehearsal.sh [WHEEL_DIR] [DATA_DIR]   (defaults: .whl, .gpu-data)
#
# The carried wheels are built for the GPU machine's Python (3.12); here the same names and
# versions are installed for this Python (by name==version from the wheel file names, no
# dependencies). It found fastapi's need for opentelemetry-api (2026-12-05).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
DATA=${2:-.gpu-data}
VENV=${REHEARSAL_VENV:-/tmp/aerial-search-gpu-rehearsal}
IMAGE_PACKAGES="torch torchvision triton numpy pillow tifffile pytest fsspec xarray pyyaml pandas scipy psutil
  cloudpickle msgpack toolz sortedcontainers jinja2 packaging typing-extensions click urllib3 httpx pyarrow
  scikit-learn hypothesis attrs certifi pyparsing"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q $IMAGE_PACKAGES 2>&1 | grep -v "^WARNING: Location" || true
# dask imports importlib_metadata below Python 3.12 (the GPU machine's 3.12 has it in the standard library)
"$VENV/bin/python" -c "import sys; sys.exit(sys.version_info < (3, 12))" || "$VENV/bin/pip" install -q importlib_metadata 2>&1 | grep -v "^WARNING: Location" || true
carried=$(ls "$WHEELS"/*.whl | xargs -n1 basename | sed -E 's/^([A-Za-z0-9_.]+)-([0-9][^-]*)-.*/\1==\2/')
"$VENV/bin/pip" install -q --no-deps $carried 2>&1 | grep -v "^WARNING: Location" || true
for missing in shapely pyproj rio_tiler geopandas pystac; do  # not on the GPU machine: must not be needed there
  if "$VENV/bin/python" -c "import $missing" 2>/dev/null; then echo "rehearsal venv has $missing, which the GPU machine lacks" >&2; exit 1; fi
done
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
work=$(mktemp -d)
"$VENV/bin/python" -c "from pipeline.serve.app import create_app; import fastapi; fastapi.FastAPI()"
"$VENV/bin/python" -m pytest -q -m gpu tests/test_device_search.py tests/test_device_decode.py -p no:cacheprovider
"$VENV/bin/python" benchmarks/gpu_search.py --device cpu --float16 20000 --codes 50000 --http 20000 --cpu-n 10000 \
  --queries 1 --work "$work/search" --out "$work/gpu_search.json"
AERIAL_SEARCH_DECODE_DEVICE=cpu "$VENV/bin/python" benchmarks/gpu_ingest.py --device cpu --data "$DATA" --mosaic-px 1024 \
  --chips 40 --quick --work "$work/ingest" --out "$work/gpu_ingest.json" 2>&1 | grep -v "NotGeoreferencedWarning\|DatasetReader(path"
"$VENV/bin/python" - "$work" <<'EOF'
import json, sys
bad = [r for name in ("gpu_search.json", "gpu_ingest.json")
       for r in json.load(open(f"{sys.argv[1]}/{name}"))["rows"] if "error" in r]
print(f"rehearsal: {len(bad)} error row(s)")
for r in bad:
    print("  ", r["error"])
sys.exit(1 if bad else 0)
EOF
