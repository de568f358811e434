# Shared helpers for the e2e/cluster scripts. Sourced, never run.
# Everything the scripts build or download lives under one cache directory outside
# the clone ($WEFT_CACHE), so a second run on the same machine reuses it.

set -euo pipefail

WEFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WEFT_CACHE="${WEFT_CACHE:-$HOME/.cache/weft}"
WEFT_CLUSTER_DIR="${WEFT_CLUSTER_DIR:-$WEFT_CACHE/cluster}"
# shellcheck source=versions.env
. "$WEFT_ROOT/e2e/cluster/versions.env"

export GOMODCACHE="$WEFT_CACHE/go/mod"
export GOCACHE="$WEFT_CACHE/go/build"
export GOPATH="$WEFT_CACHE/go/path"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
# The builds reach the Go module proxy only, not the checksum database.
export GOSUMDB=off
export GOFLAGS="-mod=mod -buildvcs=false"

GO_VERSION="$(go env GOVERSION 2>/dev/null || echo unknown)"
# weft's own version: the workspace's, in Cargo.toml.
weft_version() { sed -n 's/^version = "\(.*\)"/\1/p' "$WEFT_ROOT/Cargo.toml" | head -n 1; }
WEFT_BIN="$WEFT_CACHE/bin"

log() { printf '[weft-cluster] %s\n' "$*" >&2; }
die() { printf '[weft-cluster] error: %s\n' "$*" >&2; exit 1; }

# Directory that holds one component's binaries, keyed by its version and the Go toolchain.
component_dir() { printf '%s/%s-%s-%s' "$WEFT_BIN" "$1" "$2" "$GO_VERSION"; }

kube_bin_dir() { component_dir kubernetes "$KUBERNETES_VERSION"; }
etcd_bin_dir() { component_dir etcd "$ETCD_VERSION"; }
kwok_bin_dir() { component_dir kwok "$KWOK_VERSION"; }
helm_bin_dir() { component_dir helm "$HELM_VERSION"; }
# A real node's own binaries: the kubelet (and the pause program that holds
# each pod's namespaces) and CoreDNS. Built only when real nodes are asked for.
kubelet_bin_dir() { component_dir kubelet "$KUBERNETES_VERSION"; }
coredns_bin_dir() { component_dir coredns "$COREDNS_VERSION"; }

# Absolute path of a built binary by name; fails with a message when it was not built.
bin_of() {
  local name="$1" dir
  case "$name" in
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl) dir="$(kube_bin_dir)" ;;
    etcd) dir="$(etcd_bin_dir)" ;;
    kwok) dir="$(kwok_bin_dir)" ;;
    helm) dir="$(helm_bin_dir)" ;;
    kubelet|pause) dir="$(kubelet_bin_dir)" ;;
    coredns) dir="$(coredns_bin_dir)" ;;
    *) die "unknown component binary '$name'" ;;
  esac
  if [ ! -x "$dir/$name" ]; then
    case "$name" in
      kubelet|pause|coredns) die "$name is not built (expected $dir/$name); run e2e/cluster/build --real-nodes" ;;
      *) die "$name is not built (expected $dir/$name); run e2e/cluster/build" ;;
    esac
  fi
  printf '%s/%s' "$dir" "$name"
}

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$WEFT_CACHE/target}"

# weft's own crates compile their clone's path in (`env!("CARGO_MANIFEST_DIR")`:
# the repository root, goldens, examples), and cargo does not count that path
# in what it rebuilds for. So when the build cache was last used by a clone at
# another path, those crates are rebuilt for this one (their dependencies stay
# cached); otherwise a test would read another clone's files, or none.
weft_cache_for_this_clone() {
  local stamp="$CARGO_TARGET_DIR/.weft-clone" last=""
  [ -f "$stamp" ] && last="$(cat "$stamp")"
  [ "$last" = "$WEFT_ROOT" ] && return 0
  if command -v cargo >/dev/null 2>&1 &&
    { [ -d "$CARGO_TARGET_DIR/debug" ] || [ -d "$CARGO_TARGET_DIR/release" ]; }; then
    echo "the build cache ($CARGO_TARGET_DIR) was last used by ${last:-another clone}: rebuilding weft's own crates for $WEFT_ROOT" >&2
    local profile
    for profile in "" --release; do
      cargo clean --quiet ${profile:+"$profile"} --manifest-path "$WEFT_ROOT/Cargo.toml" \
        -p weft-crds -p weft-planner -p weft-operator -p weft-trainer -p weft-e2e
    done
  fi
  mkdir -p "$CARGO_TARGET_DIR"
  printf '%s\n' "$WEFT_ROOT" > "$stamp"
}
weft_cache_for_this_clone

# Start order; `down` stops them in reverse.
COMPONENTS="etcd kube-apiserver kube-controller-manager kube-scheduler kwok"
KUBECONFIG_PATH="$WEFT_CLUSTER_DIR/kubeconfig"

# The built kubectl against the local cluster.
kctl() { "$(bin_of kubectl)" --kubeconfig="$KUBECONFIG_PATH" "$@"; }

# The e2e crate's helper binary (built when needed), for the scripts.
weft_e2e_bin() {
  (cd "$WEFT_ROOT" && cargo build -p weft-e2e --bin weft-e2e) >&2 \
    || die "could not build the weft-e2e helper"
  printf '%s' "$CARGO_TARGET_DIR/debug/weft-e2e"
}

# Prints the kwok Node objects of a cluster shorthand (built from the e2e crate, so
# label and annotation names come from weft-crds and are never spelled twice).
render_nodes() {
  "$(weft_e2e_bin)" nodes "$1"
}

# The image writer (images/ocibuild), built once per version of its module.
ocibuild_bin() {
  local bin
  bin="$WEFT_BIN/ocibuild-$(cat "$WEFT_ROOT/images/ocibuild/go.sum" "$WEFT_ROOT/images/ocibuild/main.go" | sha256sum | cut -c1-12)"
  if [ ! -x "$bin" ]; then
    log "building images/ocibuild"
    mkdir -p "$WEFT_BIN"
    (cd "$WEFT_ROOT/images/ocibuild" && go build -trimpath -o "$bin.tmp" . && mv "$bin.tmp" "$bin") >&2 \
      || die "could not build images/ocibuild"
  fi
  printf '%s' "$bin"
}

pid_of() { cat "$WEFT_CLUSTER_DIR/pids/$1" 2>/dev/null || true; }
# When process PID started (clock ticks since boot), to tell it from a later
# process given the same PID.
proc_start() { { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null || true; } | awk '{print $20}'; }
# Whether component NAME runs: its recorded PID is alive and, when its start
# was recorded, is still the process that was started.
alive() {
  local pid start
  pid="$(pid_of "$1")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  start="$(cat "$WEFT_CLUSTER_DIR/pids/$1.start" 2>/dev/null || true)"
  [ -z "$start" ] || [ "$(proc_start "$pid")" = "$start" ]
}

apiserver_ready() {
  # shellcheck disable=SC1091
  [ -f "$WEFT_CLUSTER_DIR/ports.env" ] || return 1
  . "$WEFT_CLUSTER_DIR/ports.env"
  local p="$WEFT_CLUSTER_DIR/pki"
  [ "$(curl -s --max-time 3 --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" \
      "https://127.0.0.1:$APISERVER_PORT/readyz" 2>/dev/null)" = "ok" ]
}

cluster_running() {
  local c
  [ -d "$WEFT_CLUSTER_DIR/pids" ] || return 1
  for c in $COMPONENTS; do alive "$c" || return 1; done
  apiserver_ready
}

# Names each component that is not running, with the end of its log.
report_dead_components() {
  local c dead=0
  for c in $COMPONENTS; do
    [ -n "$(pid_of "$c")" ] || continue   # not started yet
    if ! alive "$c"; then
      dead=1
      log "component $c (pid $(pid_of "$c")) is not running; last lines of its log:"
      tail -n 15 "$WEFT_CLUSTER_DIR/logs/$c.log" 2>/dev/null | sed 's/^/    /' >&2 || true
    fi
  done
  return $dead
}

free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Runs a component in its own session, logging to logs/NAME.log, and records its PID.
# Its own session, so its PID is also its process group's (stop_component
# stops the group).
spawn() {
  local name="$1"; shift
  setsid "$@" >"$WEFT_CLUSTER_DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$WEFT_CLUSTER_DIR/pids/$name"
  proc_start $! > "$WEFT_CLUSTER_DIR/pids/$name.start" || true
}

# Waits until "$2..." succeeds, failing with the component's log when it dies or times out.
await() {
  local name="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      report_dead_components || true
      die "$name exited during start-up"
    fi
    [ $SECONDS -lt $deadline ] || { tail -n 20 "$WEFT_CLUSTER_DIR/logs/$name.log" >&2; die "$name not ready after $timeout s"; }
    sleep 0.3
  done
}

make_pki() {
  local p="$WEFT_CLUSTER_DIR/pki"
  mkdir -p "$p"
  (
    cd "$p"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=weft-local-ca -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=weft-admin" -keyout admin.key -out admin.csr 2>/dev/null
    printf 'extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1\n' > ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile ext -out admin.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
  ) || die "could not create certificates with openssl"
}

kwok_stage_config() {
  local stages; stages="$(kwok_bin_dir)/stages"
  local f
  for f in node-initialize node-heartbeat-with-lease pod-ready pod-complete pod-delete \
           node-not-ready pod-container-running-failed; do
    [ -f "$stages/$f.yaml" ] || die "kwok stage $f missing from $stages"
    cat "$stages/$f.yaml"; echo "---"
  done
}

# Starts the control plane; with an argument "real", its API server reaches real
# nodes (see real-nodes.sh), which can then be added at any time.
start_control_plane() {
  local real="${1:-}"
  command -v openssl >/dev/null || die "openssl is needed for the control plane's certificates"
  command -v curl >/dev/null || die "curl is needed to check the control plane's health"
  rm -rf "$WEFT_CLUSTER_DIR"
  mkdir -p "$WEFT_CLUSTER_DIR"/{pids,logs,etcd,kwok}
  local d="$WEFT_CLUSTER_DIR" p="$WEFT_CLUSTER_DIR/pki"
  make_pki
  read -r ETCD_PORT ETCD_PEER_PORT APISERVER_PORT KCM_PORT SCHEDULER_PORT KWOK_PORT <<< "$(free_ports 6)"
  cat > "$d/ports.env" <<PORTS
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
APISERVER_PORT=$APISERVER_PORT
KCM_PORT=$KCM_PORT
SCHEDULER_PORT=$SCHEDULER_PORT
KWOK_PORT=$KWOK_PORT
PORTS

  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  spawn etcd "$(bin_of etcd)" --name=weft --data-dir="$d/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="weft=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level=warn
  await etcd 30 sh -c "curl -s --max-time 2 http://127.0.0.1:$ETCD_PORT/health | grep -q '\"health\":\"true\"'"

  local egress=()
  if [ "$real" = real ]; then
    # Every connection to a node goes through the CONNECT relay in the nodes'
    # network namespace (kwok nodes have nothing to connect to either way).
    mkdir -p "$(real_dir)"
    cat > "$d/egress.yaml" <<EGRESS
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: $(real_dir)/egress.sock
EGRESS
    egress=(--egress-selector-config-file="$d/egress.yaml")
    touch "$d/reaches-real-nodes"
  fi
  log "starting kube-apiserver on 127.0.0.1:$APISERVER_PORT"
  spawn kube-apiserver "$(bin_of kube-apiserver)" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
    --tls-cert-file="$p/admin.crt" --tls-private-key-file="$p/admin.key" --client-ca-file="$p/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$p/sa.key" --service-account-signing-key-file="$p/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 --authorization-mode=Node,RBAC --allow-privileged=true \
    --endpoint-reconciler-type=none --cert-dir="$d/apiserver-certs" \
    --requestheader-client-ca-file="$p/ca.crt" --requestheader-allowed-names=weft-admin \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$p/admin.crt" --proxy-client-key-file="$p/admin.key" \
    --kubelet-client-certificate="$p/admin.crt" --kubelet-client-key="$p/admin.key" \
    --kubelet-preferred-address-types=InternalIP,Hostname "${egress[@]}"
  await kube-apiserver 90 apiserver_ready

  local kc="$KUBECONFIG_PATH" k; k="$(bin_of kubectl)"
  "$k" config --kubeconfig="$kc" set-cluster weft-local --server="https://127.0.0.1:$APISERVER_PORT" \
    --certificate-authority="$p/ca.crt" --embed-certs >/dev/null
  "$k" config --kubeconfig="$kc" set-credentials weft-admin --client-certificate="$p/admin.crt" \
    --client-key="$p/admin.key" --embed-certs >/dev/null
  "$k" config --kubeconfig="$kc" set-context weft-local --cluster=weft-local --user=weft-admin >/dev/null
  "$k" config --kubeconfig="$kc" use-context weft-local >/dev/null

  log "starting kube-controller-manager, kube-scheduler and kwok"
  spawn kube-controller-manager "$(bin_of kube-controller-manager)" --kubeconfig="$kc" \
    --authentication-kubeconfig="$kc" --authorization-kubeconfig="$kc" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --leader-elect=false --controllers='*' \
    --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
    --cluster-signing-cert-file="$p/ca.crt" --cluster-signing-key-file="$p/ca.key" \
    --node-monitor-period=2s --node-monitor-grace-period=20s
  spawn kube-scheduler "$(bin_of kube-scheduler)" --kubeconfig="$kc" \
    --authentication-kubeconfig="$kc" --authorization-kubeconfig="$kc" \
    --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --leader-elect=false
  kwok_stage_config > "$d/kwok-stages.yaml"
  KWOK_WORKDIR="$d/kwok" spawn kwok "$(bin_of kwok)" --kubeconfig="$kc" --config="$d/kwok-stages.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds=40 --cidr=10.0.0.0/16 --node-ip=10.0.0.1 \
    --server-address="127.0.0.1:$KWOK_PORT"
  await kube-controller-manager 60 curl -sk --max-time 2 -f "https://127.0.0.1:$KCM_PORT/healthz"
  await kube-scheduler 60 curl -sk --max-time 2 -f "https://127.0.0.1:$SCHEDULER_PORT/healthz"
  # Pods are refused in a namespace until its `default` ServiceAccount exists.
  await kube-controller-manager 60 kctl get serviceaccount default -n default
  report_dead_components || die "a component died during start-up"
}

# Stops every component by PID, newest first, and removes the cluster's state.
stop_control_plane() {
  local c pid order=""
  # Best effort: whatever the real nodes leave, the control plane stops.
  real_nodes_down || log "the real nodes' tear-down failed; stopping the control plane all the same"
  for c in $COMPONENTS; do order="$c $order"; done
  for c in $order; do
    pid="$(pid_of "$c")"
    alive "$c" && kill "$pid" 2>/dev/null && log "stopped $c (pid $pid)"
  done
  for c in $order; do
    pid="$(pid_of "$c")"; [ -n "$pid" ] || continue
    for _ in $(seq 1 50); do alive "$c" || break; sleep 0.1; done
    if alive "$c"; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  rm -rf "$WEFT_CLUSTER_DIR"
}

# shellcheck source=real-nodes.sh
. "$WEFT_ROOT/e2e/cluster/real-nodes.sh"
