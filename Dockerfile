# One image for every Conveyor service; the Deployment picks the service:
#   conveyor run <service>
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 CONVEYOR_DATA_ROOT=/data
COPY pyproject.toml README.md ./
COPY common common
COPY ingestion ingestion
COPY preparation preparation
COPY segregation segregation
COPY training training
COPY evaluation evaluation
COPY scoring scoring
COPY monitoring monitoring
COPY protos protos
COPY deploy/k8s/base/pipeline.yaml config/pipeline.yaml
RUN pip install --no-cache-dir . \
 && useradd --uid 10001 --no-create-home conveyor && mkdir -p /data && chown conveyor /data
USER 10001
ENTRYPOINT ["conveyor"]
CMD ["status"]
