#!/usr/bin/env bash
# The local demo: a private PostgreSQL with logical replication, generated changes streaming
# into ./philotes-demo (SQLite catalog + Iceberg warehouse), /metrics live on :8080.
# Extra arguments go to `philotes demo` (e.g. --duration 30s, --rate 500).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_postgres
if [ ! -x "$CARGO_TARGET_DIR/debug/philotes" ]; then
  echo "▶ building philotes into $CARGO_TARGET_DIR (the first build takes a few minutes on a small machine; later ones are quick)"
fi
# Cargo shows its progress (crate count and the one being compiled) on a terminal.
cargo build --locked --bin philotes
exec "$CARGO_TARGET_DIR/debug/philotes" demo "$@"
