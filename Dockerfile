# Philotes agent image: `docker build -t philotes:local .` (compose.yaml builds it as well).
#
# Stage 1 builds the release binary with the same cargo command as CI/scripts; stage 2 is a
# slim Debian runtime with the binary, CA certificates and curl (for the healthcheck), run as
# an unprivileged user.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
ENV CARGO_TARGET_DIR=/build/target
# Only what the build reads: the workspace manifest, the lock file and the crate (its tests/
# and benches/ must be present because agent/Cargo.toml declares them).
COPY Cargo.toml Cargo.lock ./
COPY agent ./agent
# --locked: build exactly the dependency versions in Cargo.lock.
RUN cargo build --release --locked --bin philotes \
 && install -m 0755 /build/target/release/philotes /philotes

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 philotes \
 && useradd --system --uid 10001 --gid philotes --home-dir /var/lib/philotes --create-home \
        --shell /usr/sbin/nologin philotes \
 && mkdir -p /etc/philotes
COPY --from=builder /philotes /usr/local/bin/philotes
# Relative paths in a config (e.g. the default SQLite catalog ./data) land in the user's home.
WORKDIR /var/lib/philotes
USER philotes
# API, /metrics and /health/* (api.listen must be 0.0.0.0:8080 in the mounted config).
EXPOSE 8080
# Ready = every pipeline is streaming (503 with reasons until then).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -fsS http://localhost:8080/health/ready || exit 1
ENTRYPOINT ["/usr/local/bin/philotes"]
CMD ["run", "--config", "/etc/philotes/philotes.toml"]
