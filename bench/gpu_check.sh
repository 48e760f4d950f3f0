#!/usr/bin/env bash
# On a machine with a GPU: check and measure this checkout in one go.
#
#   bash bench/gpu_check.sh [all|tests|bench] [extra pytest arguments]
#
#   1. peers: wheels lying in .whl/ (e.g. made on a machine with registry access by
#      `pip download --no-deps mlstm-kernels==2.0.6 fla-core==0.6.0 -d .whl`) are installed into a
#      temporary folder put on PYTHONPATH, never into the environment (docs/performance.md §5);
#   2. python -m tfla_cupy.precompile: every kernel compiled for this card (CuPy's cache);
#   3. tests (all, tests): pytest -m gpu tests;
#   4. benchmarks (all, bench): bench/bench.py (main shape, peers when they import) and
#      bench/bench_decode.py.
#
# The checkout itself is imported (PYTHONPATH), whatever the environment has installed. $PYTHON
# names the interpreter (default python3). Logs and result files go to $OUT when it is set, else
# to a new temporary folder; the last line says where. Exit status 1 if any step failed, 2 on
# bad usage.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
case $what in
  all | tests | bench) shift || true ;;
  *) echo "usage: bash bench/gpu_check.sh [all|tests|bench] [extra pytest arguments]" >&2; exit 2 ;;
esac
py=${PYTHON:-python3}
out=${OUT:-$(mktemp -d -t tfla_gpu_check.XXXXXX)}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

if ! "$py" -c "import cupy, sys; sys.exit(0 if cupy.cuda.is_available() else 1)" 2> /dev/null; then
  echo "gpu_check.sh: no CUDA GPU found through CuPy ($py); nothing was run" | tee "$out/card.txt"
  echo "# logs in $out"
  exit 1
fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader | tee "$out/card.txt"
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d -t tfla_peers.XXXXXX)
  if "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$site"
    echo "# peers from .whl/ installed into $site"
  else
    echo "# installing the wheels of .whl/ failed: the benchmark runs without those peers"
  fi
fi

"$py" -m tfla_cupy.precompile 2>&1 | tee "$out/precompile.txt" | tail -3 || status=1

if [[ $what == all || $what == tests ]]; then
  "$py" -m pytest -q -m gpu -p no:cacheprovider "$@" tests 2>&1 | tee "$out/pytest.txt" | tail -40 || status=1
fi

if [[ $what == all || $what == bench ]]; then
  "$py" bench/bench.py --out "$out" 2>&1 | tee "$out/bench.txt" || status=1
  "$py" bench/bench_decode.py --out "$out" 2>&1 | tee "$out/bench_decode.txt" || status=1
fi

echo "# logs in $out"
exit $status
