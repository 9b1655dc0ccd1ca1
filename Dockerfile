# The detector image used by docker-compose.yml (worker, topic creation, simulator).
# The build stage compiles the detector modules (setup.py); the image keeps only the wheel.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY streams ./streams
COPY detectors ./detectors
COPY schemas ./schemas
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV ABUSE_DATA_DIR=/data/worker
VOLUME ["/data"]
ENTRYPOINT ["abuse-detector"]
CMD ["worker"]
