#!/usr/bin/env bash
# Run every test against real components: installs PostgreSQL and the Python readers if
# missing, builds once (debug), then runs unit and integration tests.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_postgres
ensure_prometheus
ensure_compose
ensure_kubectl
ensure_venv
export PHILOTES_TEST_PYTHON="$VENV/bin/python"
# Integration tests each start a PostgreSQL and an agent; two at a time suits 2 cores.
cargo test --locked --workspace --all-targets -- --test-threads=2
