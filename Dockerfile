FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
        openssh-client rsync tar zstd pigz mariadb-client postgresql-client \
        nbdkit libnbd-bin fuse3 util-linux kmod xfsprogs \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ferry ./ferry
COPY shared ./shared
COPY services ./services
COPY examples ./examples
RUN pip install --no-cache-dir .
ENTRYPOINT ["ferry"]
