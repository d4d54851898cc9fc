# `ferry broker setup` as docker-compose's one-shot broker-setup service: Ferry, and
# rabbitmqctl (Debian's rabbitmq-server, 3.10 like the broker; the server is never started
# here). rabbitmqctl reaches the node rabbit@rabbitmq with the Erlang cookie from the
# broker's volume.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends rabbitmq-server \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ferry ./ferry
COPY shared ./shared
COPY services ./services
COPY examples ./examples
RUN pip install --no-cache-dir .
ENTRYPOINT ["ferry"]
