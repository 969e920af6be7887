# The demo service (`cottontail-demo`) and the operator CLI (`cottontail`).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p cottontail-demo -p cottontail-cli --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cottontail-demo /usr/local/bin/cottontail-demo
COPY --from=build /src/target/release/cottontail /usr/local/bin/cottontail
USER nobody
EXPOSE 9090
ENV COTTONTAIL_HTTP_ADDR=0.0.0.0:9090
HEALTHCHECK --interval=10s --timeout=3s CMD curl -fsS http://127.0.0.1:9090/health/ready || exit 1
ENTRYPOINT ["/usr/local/bin/cottontail-demo"]
