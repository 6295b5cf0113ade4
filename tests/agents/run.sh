#!/usr/bin/env bash
# Runs the REAL coding-agent clients (Claude Code, Codex CLI, opencode; npm packages, unmodified)
# against ds4-server built from this tree. Each scenario starts its own server on a free loopback
# port (synthetic demo model, scripted --test-output, temp --kv-disk-dir, --api-key) behind a
# logging proxy, runs one client non-interactively with a timeout and checks the client's
# output and the requests it sent. Prints PASS/FAIL per scenario; exits 1 on any failure.
#
# Usage: tests/agents/run.sh [--keep] [--all] [claude|codex|opencode|SCENARIO ...]
#        (--all adds the slower extended scenarios: opencode_anthropic, opencode_overflow)
# Env:   DS4_AGENTS_PREFIX  npm prefix for the clients (default: <repo>/.npm-agents, git-ignored)
#        DS4_AGENTS_OUT     keep all logs there (default: temp dir, kept only on failure/--keep)
#        DS4_SERVER_BIN     use this server binary instead of building one
#        DS4_AGENTS_NO_INSTALL=1  never run npm (skip clients that are not installed)
# Clients that cannot be installed (no npm, no registry) are skipped with a message (exit 0).
# The clients only ever talk to 127.0.0.1; telemetry, update checks and title/analytics
# traffic to their vendors are disabled by env/config (see tests/agents/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

# Versions verified by tests/agents/README.md; bump deliberately.
CLAUDE_PKG="@anthropic-ai/claude-code@2.1.332"
CODEX_PKG="@openai/codex@0.169.0"
OPENCODE_PKG="opencode-ai@1.18.33"

PREFIX="${DS4_AGENTS_PREFIX:-$ROOT/.npm-agents}"
BIN="$PREFIX/node_modules/.bin"

installed_version() { # pkg-name -> version or empty
    local f="$PREFIX/node_modules/$1/package.json"
    [ -f "$f" ] && python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$f" || true
}

want=()
for spec in "$CLAUDE_PKG" "$CODEX_PKG" "$OPENCODE_PKG"; do
    name="${spec%@*}"; ver="${spec##*@}"
    [ "$(installed_version "$name")" = "$ver" ] || want+=("$spec")
done
if [ ${#want[@]} -gt 0 ] && [ -z "${DS4_AGENTS_NO_INSTALL:-}" ]; then
    if command -v npm >/dev/null 2>&1; then
        echo "agents: installing ${want[*]} into $PREFIX" >&2
        # One package at a time so that one unavailable client does not block the others.
        for spec in "${want[@]}"; do
            timeout 300 npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error "$spec" >&2 \
                || echo "agents: could not install $spec (its scenarios will be skipped)" >&2
        done
    else
        echo "agents: npm not found; clients that are not installed will be skipped" >&2
    fi
fi
echo "agents: claude $(installed_version @anthropic-ai/claude-code), codex $(installed_version @openai/codex), opencode $(installed_version opencode-ai)" >&2

if [ -z "${DS4_SERVER_BIN:-}" ]; then
    cargo build --release -p ds4-server >&2
    DS4_SERVER_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/ds4-server"
fi
export DS4_SERVER_BIN DS4_AGENTS_BIN="$BIN"
exec python3 tests/agents/agents.py "$@"
