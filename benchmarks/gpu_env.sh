# Sourced by the GPU check scripts: the card, the carried wheels installed into /tmp/site (no
# index on the GPU machine), this checkout on PYTHONPATH. Usage: source benchmarks/gpu_env.sh WHEEL_DIR
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# installed once per machine: a second check script in the same call (gpu_checks.sh) reuses it
if [ "$(ls "$1" | md5sum)" != "$(cat /tmp/site/.wheels 2>/dev/null)" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
  ls "$1" | md5sum > /tmp/site/.wheels
fi
export PYTHONPATH=/tmp/site:$PWD
