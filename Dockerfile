# aerostream daemon image. Built by docker-compose.yml; the binary is the same `aerostream` that
# the tests run (same Cargo.lock, `--locked`), in release mode.
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock config.toml ./
COPY actors actors
COPY schemas schemas
COPY src src
COPY tests tests
COPY examples examples
COPY benches benches
RUN cargo build --release --locked --bin aerostream

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/aerostream aerostream \
    && mkdir -p /var/lib/aerostream && chown aerostream /var/lib/aerostream
COPY --from=build /src/target/release/aerostream /usr/local/bin/aerostream
COPY config.toml /etc/aerostream/config.toml
USER aerostream
WORKDIR /var/lib/aerostream
ENV AEROSTREAM__DAEMON__DATA_DIR=/var/lib/aerostream/data \
    AEROSTREAM__HTTP__LISTEN=0.0.0.0:8080 \
    AEROSTREAM__DAEMON__LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["aerostream"]
CMD ["run", "--config", "/etc/aerostream/config.toml"]
