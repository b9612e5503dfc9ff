#!/usr/bin/env bash
# Training speed on an accelerator, one command (issue 31): the seed notebook's epoch (benchmarks/train.py:
# NestedLSTM(40, depth=2) on 214 200 windows x 33 months, batch 128, beside keras' LSTM) and a full-size run of the
# whole flow (benchmarks/full_run.py --scale full: the step table and each training stage's s/epoch).
#
#   benchmarks/device.sh wheels    # here, with pip and the project's .venv: every package the GPU machine lacks,
#                                  # at the versions this venv runs, as Python 3.12 wheels in .whl/
#   benchmarks/device.sh run       # there, from the repo root, with .whl/ beside it: installs them into
#                                  # /tmp/site, runs both on KERAS_BACKEND=jax (the machine has JAX, no TensorFlow)
#
# The GPU machine (nvidia-h200, /work/.library/device) has CUDA's JAX, numpy, pyarrow and matplotlib but none of
# prefect, great-expectations, keras, lightgbm or pydantic, and no package index: they travel as wheels (`carry`:
# .whl, about 60 MB of the call's 64 MiB). Logs go to $OUT (the device tool's folder) or ./device-out.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
# Already on the GPU machine's image, at versions nestcast runs with, or too large to travel; pandas travels because
# its 3.x would change string dtypes under nestcast.
ON_DEVICE='^(numpy|scipy|ml[-_]dtypes|opt[-_]einsum|h5py|pyyaml|regex|pygments|markupsafe|charset[-_]normalizer|pyarrow|matplotlib|pillow|kiwisolver|fonttools|contourpy|cycler|narwhals|jax|jaxlib|tensorflow|tensorboard|protobuf|grpcio)-'

fetch_wheels() {
  local constraints
  constraints=$(mktemp)
  .venv/bin/python -m pip freeze --exclude-editable | grep -v -E '^nestcast|@ file' >"$constraints"
  mkdir -p "$WHEELS"
  grep -qxF "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >>.git/info/exclude
  .venv/bin/python -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -c "$constraints" -d "$WHEELS" \
    prefect fastapi 'sqlalchemy[asyncio]' keras great-expectations lightgbm pydantic pydantic-settings typer optuna \
    tqdm pandas
  find "$WHEELS" -name '*.whl' | while read -r wheel; do
    if basename "$wheel" | tr 'A-Z' 'a-z' | grep -qE "$ON_DEVICE"; then rm "$wheel"; fi
  done
  rm -f "$constraints"
  echo "$(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS/"
}

run_on_device() {
  local out=${OUT:-device-out}
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
  python3 -c 'import jax, keras, pandas, prefect; print("jax", jax.__version__, jax.devices(), "keras", keras.__version__,
"pandas", pandas.__version__, "prefect", prefect.__version__)' | tee -a "$out/device.txt"
  echo "== the seed's epoch (batch 128, then larger batches), NLSTM beside keras' LSTM"
  python3 benchmarks/train.py --variants nlstm nlstm-dropin lstm --batch-sizes 128 1024 --device gpu \
    --json "$out/train.json" 2>&1 | tee "$out/train.txt"
  echo "== a full-size run of the flow"
  python3 benchmarks/full_run.py --data-dir /tmp/nestcast-full --scale full --tag "full on $(hostname)" 2>&1 \
    | grep -v -E '^\s*$|WARNING|Warning' | tee "$out/full_run.txt"
}

case "${1:-}" in
  wheels) fetch_wheels ;;
  run) run_on_device ;;
  *) echo "usage: $0 wheels|run" >&2; exit 2 ;;
esac
