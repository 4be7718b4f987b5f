# One image for every Conveyor service; each Kubernetes Deployment picks one with
#   conveyor run <service>
# Build:  docker build -t conveyor:dev .
# Library versions are those of constraints.txt (frozen from the tested .venv), so a model
# pickled by one version is loaded by the same. grpcio-tools only generates the gRPC stubs
# in the build stage; the runtime stage has the installed venv, tini and nothing else.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/conveyor/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
RUN python -m venv /opt/conveyor \
 && pip install --constraint constraints.txt grpcio-tools
COPY pyproject.toml README.md ./
COPY app app
COPY common common
COPY ingestion ingestion
COPY preparation preparation
COPY segregation segregation
COPY training training
COPY evaluation evaluation
COPY scoring scoring
COPY monitoring monitoring
COPY protos protos
# The stubs are generated here, as scripts/setup.sh does locally (never committed), then
# installed with the packages; grpcio-tools leaves with the build stage.
RUN python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \
      protos/conveyor/scoring/v1/scoring.proto protos/inference/grpc_service.proto \
 && pip install --constraint constraints.txt . \
 && pip uninstall --yes grpcio-tools

FROM ${PYTHON_IMAGE} AS runtime
# tini is PID 1: it forwards SIGTERM to conveyor (which finishes the message in hand) and
# reaps the training and scoring worker processes.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends tini=0.19.0-1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin conveyor \
 && mkdir /data && chown 10001:10001 /data
COPY --from=build /opt/conveyor /opt/conveyor
COPY deploy/k8s/base/pipeline.yaml /app/config/pipeline.yaml
# A read-only root filesystem on Kubernetes: no bytecode written, HOME and caches in /tmp.
ENV PATH=/opt/conveyor/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp CONVEYOR_DATA_ROOT=/data
WORKDIR /app
USER 10001:10001
EXPOSE 9100 50051
ENTRYPOINT ["tini", "--", "conveyor"]
CMD ["status"]
