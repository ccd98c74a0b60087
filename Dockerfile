# syntax=docker/dockerfile:1
# Pacer's image: the binary, CA certificates and a non-root user (distroless, nothing else).
# `make image` assembles the same image without a daemon or a pulled base (hack/image.sh), and
# `make test` lints this file and smoke-runs that image.

# Debian 12 here and in the runtime stage: the binary links the glibc it runs on.
FROM docker.io/library/rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
# .cargo/config.toml comes along: it sets the allocator's build flags.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin pacer \
    && cp target/release/pacer /pacer

# glibc, libgcc, CA certificates, /etc/passwd with nonroot (65532); no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /pacer /usr/local/bin/pacer
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/pacer"]
