# syntax=docker/dockerfile:1.7
# optserve's images, from one Dockerfile in four stages:
#   base     the pinned slim interpreter, its settings and the non-root user, shared by the others
#   builder  wheels for the service (/wheels/server) and the SDK (/wheels/trainer); never shipped
#   trainer  `--target trainer`: the SDK with its demo extras (scikit-learn, matplotlib, tqdm, gymnasium) and its
#            reference training loop, `python -m optserve.demo --url ...`. A stage of its own rather than
#            a build arg on the server image: the API image carries none of their ~290 MB, and the
#            trainer none of the server (it only ever talks to one over HTTP).
#   runtime  the default (last) stage: the API server only, SQLite on the /data volume unless
#            OPTSERVE_STORE says otherwise (docker-compose.yml points it at Redis).
#   docker build -t optserve-server .
#   docker build --target trainer -t optserve-trainer .
# Each shipped stage installs every wheel of its own directory, exactly the set the builder resolved, with
# --no-index, from a BuildKit bind mount: neither a wheel nor a compiler lands in one of their layers.

ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 optserve \
    && useradd --system --uid 10001 --gid optserve --no-log-init --create-home \
        --home-dir /home/optserve --shell /usr/sbin/nologin optserve
WORKDIR /home/optserve

FROM base AS builder
WORKDIR /src
# Every dependency ships manylinux wheels for CPython 3.11, so `pip wheel` downloads them and builds only
# the two pure-Python local projects: no compiler is needed even here. The SDK comes first: it changes
# less often than app/, so an app/ edit does not re-download scikit-learn and matplotlib.
COPY clients/python ./clients/python
RUN pip wheel --no-cache-dir --wheel-dir /wheels/trainer "./clients/python[demo]"
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip wheel --no-cache-dir --wheel-dir /wheels/server .

FROM base AS trainer
RUN --mount=type=bind,from=builder,source=/wheels/trainer,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl
# matplotlib draws to files (demo-output/ under the WORKDIR): no display in a container
ENV MPLBACKEND=Agg
USER 10001:10001
# a server to train through is required: `docker run optserve-trainer python -m optserve.demo --url ...`
CMD ["python", "-m", "optserve.demo", "--help"]

FROM base AS runtime
RUN --mount=type=bind,from=builder,source=/wheels/server,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels /wheels/*.whl
# The volume's mount point must exist, owned by the user, before VOLUME: a fresh named volume copies it.
RUN mkdir /data && chown optserve:optserve /data
# site-packages is root's, so numba's on-disk kernel cache (cache=True) goes where the user may write.
ENV OPTSERVE_HOST=0.0.0.0 \
    OPTSERVE_PORT=8000 \
    OPTSERVE_STORE=sqlite:////data/optserve.db \
    NUMBA_CACHE_DIR=/tmp/numba-cache
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8000
# The slim image has no curl: the standard library asks /healthz; urlopen raises (exit 1) unless 2xx.
# The start period covers the numba warm-up before the server listens.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OPTSERVE_PORT', '8000') + '/healthz', timeout=2)"]
CMD ["optserve", "serve"]
