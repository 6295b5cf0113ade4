#!/usr/bin/env bash
# Builds ds4-server (release) and runs the Python SDK tests against the real binary.
# Usage: tests/server/run.sh [pytest args]   (needs: pip install -r tests/server/requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p ds4-server
export DS4_SERVER_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/ds4-server"
python3 -m pytest -q tests/server "$@"
