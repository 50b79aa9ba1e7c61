# syntax=docker/dockerfile:1
#
# The gateway image: `docker build -t chat-gateway .` (docker-compose.yml builds it too).
# Stage 1 compiles the dependencies in their own layer (only the manifests and stub sources
# are copied first, so editing the gateway's code does not recompile its dependencies);
# stage 2 is a small Debian runtime running the binary as a non-root user.

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src

# Dependency layer: the workspace manifests plus stub sources for every member (gateway, tests
# = crate e2e, loadgen). Every `path = "..."` named in a member manifest gets a stub too, so a
# new explicit [[bin]] or [lib] does not break this step.
COPY Cargo.toml Cargo.lock ./
COPY gateway/Cargo.toml gateway/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
COPY loadgen/Cargo.toml loadgen/Cargo.toml
RUN set -eu; \
    for member in gateway tests loadgen; do \
        mkdir -p "$member/src"; \
        echo 'fn main() {}' > "$member/src/main.rs"; \
        : > "$member/src/lib.rs"; \
        for target in $(sed -n 's/^[[:space:]]*path[[:space:]]*=[[:space:]]*"\(.*\.rs\)".*/\1/p' "$member/Cargo.toml"); do \
            mkdir -p "$(dirname "$member/$target")"; \
            echo 'fn main() {}' > "$member/$target"; \
        done; \
    done; \
    cargo build --release --locked -p gateway; \
    rm -rf gateway/src

# The gateway itself (sources and the static chat page it embeds). The files are touched so
# cargo never mistakes them for older than the stub build.
COPY gateway gateway
RUN set -eu; \
    find gateway -type f -exec touch {} +; \
    cargo build --release --locked -p gateway; \
    cp target/release/gateway /usr/local/bin/gateway

FROM debian:bookworm-slim AS runtime
# ca-certificates for rediss:// and OTLP over TLS; curl for the health checks.
RUN set -eu; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 gateway; \
    useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway
COPY --from=build /usr/local/bin/gateway /usr/local/bin/gateway

USER gateway:gateway
ENV GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_ADMIN_LISTEN=0.0.0.0:9091 \
    GATEWAY_LOG_FORMAT=json
# 8080: WebSocket + chat page (put nginx in front). 9091: /metrics /healthz /readyz (admin:
# keep it on the internal network, never behind the public proxy).
EXPOSE 8080 9091
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=10 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9091/readyz"]
# SIGTERM: the gateway closes WebSockets with 1012 and announces leaves within
# GATEWAY_SHUTDOWN_GRACE_MS before exiting.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/gateway"]
