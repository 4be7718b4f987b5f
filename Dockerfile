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
# gRPC stubs are generated here, as scripts/setup.sh does locally (never committed).
RUN pip install --no-cache-dir "grpcio-tools>=1.62" \
 && python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \
      $(find protos -name '*.proto') \
 && pip install --no-cache-dir . \
 && useradd --uid 10001 --no-create-home conveyor && mkdir -p /data && chown conveyor /data
USER 10001
ENTRYPOINT ["conveyor"]
CMD ["status"]
