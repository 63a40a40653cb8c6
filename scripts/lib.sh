# Shared set-up steps for scripts/*.sh and .ci/run. Every step is idempotent: a fresh machine
# gets what it lacks, a prepared one loses no time.

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/philotes-target}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-test"

apt_install() {
  # Install Debian packages only when missing; apt needs root (CI and these machines are root).
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing: ${missing[*]}"
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_postgres() {
  # Server binaries (initdb, pg_ctl, postgres) and psql/pg_recvlogical.
  if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt_install postgresql
  fi
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client
  # The Debian package may start a system cluster; the tests never use it.
  command -v openssl >/dev/null 2>&1 || apt_install openssl
}

ensure_prometheus() {
  # Prometheus 2.42 + promtool for the scrape tests (the package's own service is not used).
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || apt_install prometheus
}

ensure_compose() {
  # Debian's docker-compose 1.29 validates compose.yaml statically (no engine is needed).
  command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose
}

ensure_kubectl() {
  # `kubectl kustomize` renders deploy/kubernetes for the manifest test (Debian's kubectl is
  # the kubernetes-client package; a newer kubectl already on PATH is used as is).
  command -v kubectl >/dev/null 2>&1 || apt_install kubernetes-client
}

ensure_venv() {
  # Independent readers (PyIceberg, DuckDB) and test tools, in a git-ignored venv.
  local req="$ROOT/agent/tests/py/requirements.txt"
  local stamp="$VENV/.requirements.sha"
  local want; want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
  python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
}
