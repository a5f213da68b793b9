# Sourced by `scripts/test` and `.ci/run`: puts in place what the tests need beyond Rust.
#
# - `protoc`, for the gRPC example's code generation (Debian's `protobuf-compiler`);
# - `redis-server`, for the Redis Streams store's tests, which start their own servers on free
#   ports (Debian's `redis-server`; the package's own service is not used);
# - `promtool` and `amtool`, for the ops files' tests (tower-degrade/tests/ops.rs): Debian's
#   `prometheus` and `prometheus-alertmanager` (only their command-line tools are used);
# - ONNX Runtime, for the predictor's tests: the CPU library inside the PyPI `onnxruntime`
#   wheel, installed into a virtual environment under target/ (nothing is downloaded from
#   outside PyPI). ort loads it at run time from `ORT_DYLIB_PATH`. The `onnx` package lets the
#   training harness's tests check how models are stamped with their feature list.
#
# With both in place, the predictor's tests fail rather than skip if the library is missing.

if [ -z "${PROTOC:-}" ] && ! command -v protoc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing protoc (Debian's protobuf-compiler) for the gRPC example"
    apt-get update -qq && apt-get install -y -qq protobuf-compiler >/dev/null
  else
    echo "error: the gRPC example needs protoc: 'sudo apt-get install protobuf-compiler'," \
      "or set PROTOC to a protoc binary" >&2
    return 1 2>/dev/null || exit 1
  fi
fi

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing redis-server (Debian's) for the Redis store's tests"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  else
    echo "error: the Redis store's tests need redis-server: 'sudo apt-get install redis-server'" >&2
    return 1 2>/dev/null || exit 1
  fi
fi

td_missing=""
command -v promtool >/dev/null 2>&1 || td_missing="prometheus"
command -v amtool >/dev/null 2>&1 || td_missing="$td_missing prometheus-alertmanager"
if [ -z "${CHROMEDRIVER:-}" ] && ! command -v chromedriver >/dev/null 2>&1; then
  td_missing="$td_missing chromium chromium-driver"
fi
if [ -n "$td_missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing$td_missing (Debian's) for the ops files' tests (promtool, amtool) and" \
      "the status page's browser test (chromium, chromedriver)"
    # The packages' own services are not wanted: keep the installation from starting them.
    td_rcd=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      td_rcd=yes
    fi
    # shellcheck disable=SC2086
    apt-get update -qq && apt-get install -y -qq --no-install-recommends $td_missing >/dev/null
    [ -z "$td_rcd" ] || rm -f /usr/sbin/policy-rc.d
  else
    echo "error: the ops files' tests need promtool and amtool, the browser test chromedriver:" \
      "'sudo apt-get install$td_missing'" >&2
    return 1 2>/dev/null || exit 1
  fi
fi

if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  # The repository's target/, wherever this is sourced from (bash: BASH_SOURCE).
  td_venv="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)/target/test-venv"
  if [ ! -x "$td_venv/bin/pip" ]; then
    echo "== ONNX Runtime for the predictor's tests: a virtual environment in target/test-venv"
    if ! python3 -m venv "$td_venv" 2>/dev/null; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$td_venv"
      else
        echo "error: python3 -m venv failed: 'sudo apt-get install python3-venv'," \
          "or set ORT_DYLIB_PATH to a libonnxruntime.so" >&2
        return 1 2>/dev/null || exit 1
      fi
    fi
  fi
  "$td_venv/bin/pip" install -q onnxruntime==1.31.1 onnx==1.23.2
  ORT_DYLIB_PATH="$(ls "$td_venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n 1)"
  export ORT_DYLIB_PATH
  # The harness's Python tests use the wheel's NumPy.
  export PATH="$td_venv/bin:$PATH"
fi
export TOWER_DEGRADE_AI_REQUIRE_ORT=1
