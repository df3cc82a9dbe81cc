#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for executorkit: a virtual environment in .venv with
# the package (editable) and everything the tests and notebooks need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3 python3.13 python3.12 python3.11 python3.10; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: needs Python >= 3.10 (set PYTHON=...)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian ships venv separately; install it when we can.
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      rm -rf .venv && "$PY" -m venv .venv
    else
      echo "setup: '$PY -m venv' failed; install python3-venv" >&2; exit 1
    fi
  fi
fi
# A headless browser for the test of the campaign report's HTML page (skips without it).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null \
    || echo "setup: could not install chromium; the report's browser test will skip" >&2
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[all,test]"
# CPython's own concurrent.futures tests (tests/test_stdlib_conformance.py runs them against
# our executors); Debian ships them apart from the interpreter.
PYVER=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$PYVER" = 3.11 ] && [ ! -f "/usr/lib/python$PYVER/test/test_concurrent_futures.py" ] \
    && ! .venv/bin/python -c 'import test.test_concurrent_futures' >/dev/null 2>&1 \
    && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq "libpython$PYVER-testsuite" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq "libpython$PYVER-testsuite" >/dev/null; }; } \
    || echo "setup: could not install libpython$PYVER-testsuite; the stdlib conformance tests will skip"
fi
echo "setup: ready ($(.venv/bin/python --version), executorkit $(.venv/bin/python -c 'import executorkit; print(executorkit.__version__)'))"
