# syntax=docker/dockerfile:1
# One image with every cim binary: cim-server, cim-route, cim-standalone, cim-client, cim-bench,
# cim-floor (the machine's performance floor; its redis scenario needs a redis-server, which
# the image does not hold).
#
#   docker build -t cim .
#   docker run --rm -p 8080:8080 -p 9000:9000 -p 9001:9001 cim     # standalone mode
#   docker run --rm cim cim-server --help                          # any other binary
#   docker run --rm cim cim-floor broadcast                        # the machine's floor
#
# The default command is standalone mode (a route and a connection server in one process,
# state in memory) listening on 0.0.0.0; it hands clients 127.0.0.1 unless
# CIM_STANDALONE_ADVERTISE_HOST says otherwise (e.g. -e CIM_STANDALONE_ADVERTISE_HOST=192.168.1.20).
# deploy/compose/compose.yaml and deploy/k8s/ run the cluster binaries from this same image.
# tests/tests/deploy_files.rs checks the names, settings and binaries used here.

# The toolchain of the workspace's rust-version (Cargo.toml), on Debian bookworm.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
# protoc and the well-known .proto files (cim-common/build.rs compiles proto/).
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts (BuildKit) keep the crate downloads and the target directory between builds;
# the binaries are copied out of the cached target directory, which is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
    && mkdir -p /out \
    && cp target/release/cim-server target/release/cim-route target/release/cim-standalone \
          target/release/cim-client target/release/cim-bench target/release/cim-floor /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid (Kubernetes' runAsNonRoot checks it); a home for the terminal client's
# history (~/.local/share/cim).
RUN groupadd --system --gid 10001 cim \
    && useradd --system --uid 10001 --gid cim --create-home --home-dir /home/cim cim
COPY --from=builder /out/cim-server /out/cim-route /out/cim-standalone /out/cim-client /out/cim-bench /out/cim-floor /usr/local/bin/
USER 10001:10001
WORKDIR /home/cim
# Standalone mode reachable from outside the container (flags would beat -e overrides, so the
# defaults are environment variables: docker run -e CIM_STANDALONE_HTTP_LISTEN=... wins).
ENV CIM_STANDALONE_HTTP_LISTEN=0.0.0.0:8080 \
    CIM_STANDALONE_TCP_LISTEN=0.0.0.0:9000 \
    CIM_STANDALONE_WS_LISTEN=0.0.0.0:9001
# Standalone: route HTTP API + web page, client TCP, client WebSocket (/ws).
EXPOSE 8080 9000 9001
# SIGTERM (docker stop) shuts every binary down gracefully.
STOPSIGNAL SIGTERM
CMD ["cim-standalone"]
