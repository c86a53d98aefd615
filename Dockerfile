# syntax=docker/dockerfile:1
#
# tokenrelay container image.
#   docker build -t tokenrelay .
#
# The final image holds only the binary and the local-try config at
# /etc/tokenrelay/tokenrelay.toml. That config listens on 127.0.0.1 and uses a
# development API key; in Kubernetes the ConfigMap in deploy/kubernetes/ is
# mounted over /etc/tokenrelay instead (see deploy/README.md).

############################ builder ############################
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependency layer: build every dependency against stub sources so that this
# layer is reused until Cargo.toml or Cargo.lock change. Cargo checks that
# every target the manifest names exists, so the stubs cover the lib, the
# bin and the [[bench]] file.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && echo 'fn main() {}' > benches/hot_path.rs \
 && cargo build --release --locked \
 && rm -rf src benches \
           target/release/tokenrelay \
           target/release/deps/tokenrelay-* \
           target/release/deps/libtokenrelay-* \
           target/release/.fingerprint/tokenrelay-*

# The real sources. The stub artifacts were removed above and the sources are
# touched, so cargo can never mistake the stub build for a fresh one.
COPY src ./src
COPY benches ./benches
RUN find src benches -type f -exec touch {} + \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/tokenrelay /out/usr/local/bin/tokenrelay \
 && install -d -m 0750 /out/var/lib/tokenrelay

############################ runtime ############################
# distroless/cc: glibc + libgcc, CA certificates, no shell, no package
# manager. The :nonroot tag runs as uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /out/usr/local/bin/tokenrelay /usr/local/bin/tokenrelay
COPY config/tokenrelay.toml /etc/tokenrelay/tokenrelay.toml
# Writable state directory (the local-try profile's relative data/ path lands
# here). In Kubernetes an emptyDir (or a volume) is mounted over it.
# (The parent is copied so that --chown applies to the directory itself.)
COPY --from=builder --chown=65532:65532 /out/var/lib/ /var/lib/
WORKDIR /var/lib/tokenrelay

USER nonroot
# 8080: API + forward (`listen`); 9090: /healthz, /readyz, /metrics (`admin_listen`).
EXPOSE 8080 9090
# SIGTERM drains in-flight requests for `shutdown_grace`, then exits 0.
STOPSIGNAL SIGTERM

ENTRYPOINT ["/usr/local/bin/tokenrelay"]
CMD ["serve", "--config", "/etc/tokenrelay/tokenrelay.toml"]
