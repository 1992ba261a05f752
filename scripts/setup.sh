#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with smallcap and its test tools installed.
# Pass --no-demo to skip running the demo afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all,test]"
# The browser test drives Debian's Chromium (browser downloads from elsewhere are not reachable).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -q && apt-get install -y -q chromium chromium-driver
fi
if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/smallcap demo
fi
