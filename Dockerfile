# syntax=docker/dockerfile:1
# Builds both binaries (ingest, processor) into one small runtime image.
#   docker build -t stripe-purchases .
#   docker run --rm stripe-purchases ingest --help
#   docker run --rm stripe-purchases processor --help

# ---- build ---------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# 1. Dependencies only: the manifests and dummy sources, so this layer is rebuilt only when
#    Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY shared/Cargo.toml shared/Cargo.toml
COPY ingest/Cargo.toml ingest/Cargo.toml
COPY processor/Cargo.toml processor/Cargo.toml
RUN mkdir -p shared/src ingest/src processor/src \
 && touch shared/src/lib.rs ingest/src/lib.rs processor/src/lib.rs \
 && echo 'fn main() {}' > ingest/src/main.rs \
 && echo 'fn main() {}' > processor/src/main.rs \
 && cargo build --release --locked -p ingest -p processor \
 && rm -rf shared/src ingest/src processor/src

# 2. The real sources. migrations/ must be there before the build: the processor embeds it
#    at compile time (sqlx::migrate!("../migrations")).
COPY migrations migrations
COPY shared/src shared/src
COPY ingest/src ingest/src
COPY processor/src processor/src
# COPY keeps the files' old mtimes; make them newer than the dummy build so cargo rebuilds.
RUN find shared/src ingest/src processor/src -type f -exec touch {} + \
 && cargo build --release --locked -p ingest -p processor \
 && cp target/release/ingest target/release/processor /usr/local/bin/

# ---- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates for amqps:// and TLS to PostgreSQL; curl for the compose health check.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
COPY --from=builder /usr/local/bin/ingest /usr/local/bin/processor /usr/local/bin/
USER 10001:10001
EXPOSE 8080
CMD ["ingest"]
