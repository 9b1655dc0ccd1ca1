# The detector image used by docker-compose.yml (worker, topic creation, simulator).
# The build stage compiles the detector modules (setup.py) with the profile of a training run, as
# `make install` does (streams/profiled_build.py; `--build-arg PGO=0` skips it, a build about two
# minutes shorter and a worker about 3% slower); the image keeps only the wheel.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY streams ./streams
COPY detectors ./detectors
COPY schemas ./schemas
ARG PGO=1
# The training run runs the detector: its dependencies, and the build's, installed here first.
RUN if [ "$PGO" != 0 ]; then \
      pip install --no-cache-dir "setuptools>=77" wheel "Cython>=3.0,<4" . \
      && python -m streams.profiled_build --wheel /wheels; \
    else \
      pip wheel --no-cache-dir --no-deps -w /wheels .; \
    fi

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV ABUSE_DATA_DIR=/data/worker
VOLUME ["/data"]
ENTRYPOINT ["abuse-detector"]
CMD ["worker"]
