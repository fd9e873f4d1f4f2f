# syntax=docker/dockerfile:1
#
# One image with both binaries:
#   /usr/local/bin/dagmesh           (dagmesh up | metastore | executor | ...)
#   /usr/local/bin/room-scan-worker  (the room-scan example workers)
#
#   docker build -t ghcr.io/dagmesh/dagmesh:dev .
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

# ---- build ---------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src

# Protobuf code is generated with protox (pure Rust), and sqlx bundles
# SQLite (built with the C compiler already in this image): no extra
# packages are needed to build.
COPY . .

# The cache mounts keep the crate registry and the target directory between
# builds; they are not part of any layer, so the binaries are copied out of
# target/ inside the same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p dagmesh -p dagmesh-example-room-scan \
 && install -D -m 0755 target/release/dagmesh /out/dagmesh \
 && install -D -m 0755 target/release/room-scan-worker /out/room-scan-worker

# ---- runtime -------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to an OTLP collector or a database.
# tini: PID 1 that forwards SIGTERM to the service (graceful drain) and reaps
# zombies, which matters for workers that start tools as child processes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric user, so Kubernetes can verify runAsNonRoot without
# resolving names (deploy/k8s uses runAsUser: 10001).
RUN groupadd --system --gid 10001 dagmesh \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/dagmesh \
      --create-home --shell /usr/sbin/nologin dagmesh

COPY --from=build /out/dagmesh /out/room-scan-worker /usr/local/bin/

USER 10001:10001
WORKDIR /var/lib/dagmesh

# Embedded default: everything in one process on SQLite in the working
# directory. Kubernetes sets its own args (deploy/k8s) and keeps tini as the
# entrypoint by not setting `command`.
EXPOSE 7070 7071
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["dagmesh", "up"]
