# Builds both binaries (ingest, processor) into one small runtime image.
#   docker build -t stripe-purchases .
#   docker run --rm stripe-purchases ingest --help
#   docker run --rm stripe-purchases processor --help
# docker-compose.yml builds it as stripe-purchases:latest. CI (.ci/run) builds the same
# binaries with `cargo build --release --locked -p ingest -p processor`, builds this image
# through scripts/compose-smoke.sh, and scripts/check-compose.sh checks RUST_VERSION against
# the workspace's rust-version.
# Kept buildable by the classic builder (DOCKER_BUILDKIT=0): no `# syntax=` line, no
# `RUN --mount`. `cargo build` fetches the crates from the registry; where the build
# container cannot reach it, the builder image must bring them (see docs/OPERATIONS.md).

# The toolchain CI uses; at least Cargo.toml's workspace rust-version.
ARG RUST_VERSION=1.95
# Builder and runtime share the Debian release, so the binaries find the glibc they were
# linked against.
ARG DEBIAN_RELEASE=trixie

# ---- skeleton: the manifests, and a stub for every source file -----------------------------
# Every workspace member is included (a new member needs no change here), and every target
# file cargo may look for exists. The result changes only when a manifest, Cargo.lock,
# .cargo/ or the set of .rs files changes, so the dependency layer below stays cached across
# source edits (both builders cache COPY by the content copied).
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS skeleton
WORKDIR /src
COPY . .
RUN find . -type f ! -name Cargo.toml ! -name Cargo.lock ! -name '*.rs' \
      ! -path './.cargo/*' ! -name 'rust-toolchain*' -delete \
 && find . -type f -name '*.rs' -exec sh -c 'for f in "$@"; do echo "#![allow(dead_code)] fn main() { }" > "$f"; done' sh {} + \
 && find . -depth -type d -empty -delete

# ---- build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# Only sqlx::migrate! is used, which embeds migrations/ at compile time without a database.
# Offline mode makes sure no macro ever tries to reach one during the build.
ENV SQLX_OFFLINE=true

# 1. The dependencies alone, built against the stubs.
COPY --from=skeleton /src ./
RUN cargo build --release --locked -p ingest -p processor

# 2. The real sources (migrations/ included: the processor embeds it at compile time).
COPY . .
# COPY keeps the files' old mtimes; make them newer than the stub build so cargo rebuilds
# the workspace crates (the dependencies stay as built).
RUN find . -name '*.rs' -not -path './target/*' -exec touch {} + \
 && cargo build --release --locked -p ingest -p processor \
 && cp target/release/ingest target/release/processor /usr/local/bin/

# ---- runtime -------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates for amqps:// and TLS to PostgreSQL; curl for the Compose health checks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
COPY --from=builder /usr/local/bin/ingest /usr/local/bin/processor /usr/local/bin/
USER 10001:10001
# ingest's webhooks and its internal /metrics, /healthz, /readyz; the processor's.
EXPOSE 8080 9091 9090
# Both binaries stop gracefully on SIGTERM (what `docker stop` sends).
CMD ["ingest"]
