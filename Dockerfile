# The detector image used by docker-compose.yml (worker, topic creation, simulator).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY detectors ./detectors
COPY schemas ./schemas
RUN pip install --no-cache-dir .
ENV ABUSE_DATA_DIR=/data/worker
VOLUME ["/data"]
ENTRYPOINT ["abuse-detector"]
CMD ["worker"]
