#!/usr/bin/env bash
# Build the compiled engine with AddressSanitizer and UndefinedBehaviorSanitizer and
# run the engine's tests and the threaded-engine tests (route tables swapped under
# running threads) against it; the normal build is put back afterwards, also on
# failure. Needs root for the namespace tests. Not part of `make test` (it rebuilds
# and runs slowly); run it after touching csrc/:  sudo tests/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run make setup first" >&2; exit 2; }
"$PY" -c "import Cython" 2>/dev/null || .venv/bin/pip install -q "Cython>=3.0"
build() { "$PY" setup.py -q build_ext --inplace --force 2>&1 | grep -v -i -e warning -e '^$' || true; }
restore() { unset CFLAGS LDFLAGS; build; rm -rf build; }
trap restore EXIT
CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -O1 -g" \
LDFLAGS="-fsanitize=address,undefined" build
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
"$PY" -m pytest -q -p no:cacheprovider -x \
  tests/unit/test_engine_smoke.py tests/unit/test_engine_io.py tests/unit/test_frame_golden.py \
  tests/unit/test_decap_props.py tests/unit/test_offload.py tests/unit/test_routes.py \
  tests/unit/test_review_regressions.py tests/integration/test_threads.py
echo "sanitizers: no error"
