# Real kubelet nodes beside the kwok ones. Sourced by lib.sh; defines functions only.
#
# Real nodes carry the label and the taint weft.dev/real-node=true (NoSchedule):
# a pod runs there only when it tolerates the taint, and is kept there by
# selecting the label.
#
# Each real node is a kubelet and a containerd of its own (its own sockets,
# directories, ports, cgroup root), running pods in real containers with runc.
# All of them live in one network namespace that these scripts create
# ($REAL_NETNS): the pods' bridge and addresses, the nodes' addresses, the
# Service addresses of the API server and of CoreDNS. The machine's own network
# namespace keeps loopback only, and no machine-wide setting changes: the
# kubelets run in mount namespaces of their own where the kernel settings they
# would write are files of the node's, iptables is left alone, and forwarding
# stays off (pods reach each other on the bridge, and nothing else).
#
# How the two sides meet: the kubelets, CoreDNS and the pods reach the API
# server through relays from inside the namespace (127.0.0.1:<API port> and the
# `kubernetes` Service address, 10.96.0.1:443) to a Unix socket that a relay in
# the machine's namespace forwards to the API server; the API server reaches the
# kubelets (logs, exec) through its egress selector: HTTP CONNECT tunnels over a
# Unix socket served from inside the namespace by `weft-e2e connect-proxy`.

REAL_NETNS=weft-nodes
REAL_BRIDGE=weft0
# The pods' network: one subnet, a range of it per node (10.244.<i>.0/24), the
# bridge at .0.1 and node i at .0.(10+i).
REAL_POD_SUBNET=10.244.0.0/16
REAL_BRIDGE_IP=10.244.0.1
REAL_SERVICE_SUBNET=10.96.0.0/16
REAL_API_SERVICE_IP=10.96.0.1
REAL_DNS_IP=10.96.0.10
REAL_NODE_LABEL=weft.dev/real-node
REAL_MAX_NODES=200
# What a real node keeps for the machine and itself (every node sees the whole
# machine; the tests and the control plane run beside them).
REAL_SYSTEM_RESERVED_CPU=500m
REAL_SYSTEM_RESERVED_MEMORY=2Gi
# The kernel settings a kubelet writes (its setupKernelTunables), each replaced
# by a file of the node's.
REAL_KUBELET_SYSCTLS="vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes"
# Fixed places outside the cluster's directory that the kubelet, containerd,
# its shims and CNI use whatever their configuration.
REAL_FIXED_PLACES="/var/log/containers /var/lib/cni /run/containerd /run/netns"

real_dir() { printf '%s/real' "$WEFT_CLUSTER_DIR"; }
real_node_name() { printf 'weft-real-%s' "$1"; }
real_node_ip() { printf '10.244.0.%s' "$((10 + $1))"; }
real_node_dir() { printf '%s/nodes/%s' "$(real_dir)" "$(real_node_name "$1")"; }
# in_netns CMD...: runs CMD in the nodes' network namespace, nothing else changed
# (unlike `ip netns exec`, which remounts /sys and makes every mount a slave).
in_netns() { nsenter --net="/run/netns/$REAL_NETNS" -- "$@"; }

# The index of real node NAME (weft-real-<i>) that this cluster runs; fails for any other.
real_node_index() {
  local i="${1#weft-real-}"
  case "$i" in ''|*[!0-9]*) return 1 ;; esac
  [ "$1" = "$(real_node_name "$i")" ] && [ -d "$(real_node_dir "$i")" ] || return 1
  printf '%s' "$i"
}

# Indices of the real nodes this cluster runs (their directories), in order.
real_node_indices() {
  local d
  [ -d "$(real_dir)/nodes" ] || return 0
  for d in "$(real_dir)"/nodes/weft-real-*; do
    if [ -d "$d" ]; then printf '%s\n' "${d##*-}"; fi
  done | sort -n
}

# Says what this machine lacks for real nodes, one line each; prints nothing
# when it has everything. Changes nothing.
real_nodes_missing() {
  local cmd pkgs=()
  [ "$(id -u)" = 0 ] || echo "root: real nodes create network and mount namespaces, cgroups and overlay mounts (run as root)"
  for pair in containerd:containerd runc:runc ctr:containerd socat:socat nsenter:util-linux \
              unshare:util-linux ip:iproute2 gcc:gcc; do
    cmd="${pair%%:*}"
    command -v "$cmd" >/dev/null 2>&1 || pkgs+=("${pair#*:}")
  done
  for cmd in bridge host-local loopback; do
    [ -x "/usr/lib/cni/$cmd" ] || { pkgs+=(containernetworking-plugins); break; }
  done
  [ ${#pkgs[@]} -eq 0 ] || echo "Debian packages: $(printf '%s\n' "${pkgs[@]}" | sort -u | tr '\n' ' ')(scripts/ensure-tools --real-nodes installs them)"
  grep -qw overlay /proc/filesystems 2>/dev/null || modprobe -n overlay 2>/dev/null \
    || echo "a kernel with overlayfs (containerd's snapshotter)"
  [ -d /sys/module/bridge ] || modprobe -n bridge 2>/dev/null \
    || echo "a kernel with Linux bridges (the pods' network)"
  [ -d /sys/fs/cgroup/cpu ] || [ -f /sys/fs/cgroup/cgroup.controllers ] \
    || echo "cgroups mounted under /sys/fs/cgroup"
  return 0
}

# The pause image (the CRI sandbox image), made once from the pause program.
real_pause_image() {
  local tar="$WEFT_CACHE/images/pause-${PAUSE_IMAGE##*:}-$KUBERNETES_VERSION.tar" rootfs
  if [ ! -f "$tar" ]; then
    rootfs="$(mktemp -d)"
    cp "$(bin_of pause)" "$rootfs/pause"
    mkdir -p "$WEFT_CACHE/images"
    "$(ocibuild_bin)" --rootfs "$rootfs" --tag "$PAUSE_IMAGE" --out "$tar.tmp" \
      --entrypoint /pause --user 65535:65535 >/dev/null || { rm -rf "$rootfs"; die "could not write the pause image"; }
    rm -rf "$rootfs"
    mv "$tar.tmp" "$tar"
  fi
  printf '%s' "$tar"
}

# The network namespace with the bridge, the Service addresses and the relays
# to and from the API server. Idempotent.
real_network_up() {
  local r; r="$(real_dir)"
  mkdir -p "$r"
  . "$WEFT_CLUSTER_DIR/ports.env"
  # Each piece on its own, so a start that died half-way is completed.
  # What the machine had before the first real node: down leaves it so.
  [ -f "$r/host-before" ] || real_host_snapshot > "$r/host-before"
  # (A name left by an interrupted add or delete, that is no namespace, goes.)
  if [ -e "/run/netns/$REAL_NETNS" ] && ! in_netns true 2>/dev/null; then
    ip netns delete "$REAL_NETNS" 2>/dev/null || rm -f "/run/netns/$REAL_NETNS"
  fi
  if [ ! -e "/run/netns/$REAL_NETNS" ]; then
    ip netns add "$REAL_NETNS" || die "could not create the network namespace $REAL_NETNS"
  fi
  in_netns ip link set lo up
  if ! in_netns ip link show "$REAL_BRIDGE" >/dev/null 2>&1; then
    in_netns ip link add "$REAL_BRIDGE" type bridge || die "could not create the bridge $REAL_BRIDGE (a kernel without bridges?)"
    log "network namespace $REAL_NETNS: bridge $REAL_BRIDGE at $REAL_BRIDGE_IP, pods in $REAL_POD_SUBNET, no route out"
  fi
  real_netns_address "$REAL_BRIDGE_IP/16" "$REAL_BRIDGE"
  in_netns ip link set "$REAL_BRIDGE" up
  real_netns_address "$REAL_API_SERVICE_IP/32" lo
  real_netns_address "$REAL_DNS_IP/32" lo
  # The API server, from the namespace: a Unix socket here, served at the API
  # server's own port on the namespace's loopback and at the kubernetes Service.
  if ! alive real-api-relay; then
    spawn real-api-relay socat "UNIX-LISTEN:$r/api.sock,fork,unlink-early,mode=600" "TCP:127.0.0.1:$APISERVER_PORT"
  fi
  if ! alive real-api-loopback; then
    spawn real-api-loopback nsenter --net="/run/netns/$REAL_NETNS" -- \
      socat "TCP-LISTEN:$APISERVER_PORT,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$r/api.sock"
  fi
  if ! alive real-api-service; then
    spawn real-api-service nsenter --net="/run/netns/$REAL_NETNS" -- \
      socat "TCP-LISTEN:443,bind=$REAL_API_SERVICE_IP,fork,reuseaddr" "UNIX-CONNECT:$r/api.sock"
  fi
  if ! alive real-egress; then
    # (Its own line: a failed build stops here, not in a command substitution.)
    local helper; helper="$(weft_e2e_bin)"
    rm -f "$r/egress.sock"
    spawn real-egress nsenter --net="/run/netns/$REAL_NETNS" -- "$helper" connect-proxy "$r/egress.sock"
  fi
  if ! alive coredns; then
    cat > "$r/Corefile" <<COREFILE
# Names of the cluster only: no forward, so nothing else resolves and no query leaves.
cluster.local:53 {
    bind $REAL_DNS_IP
    errors
    kubernetes cluster.local {
        kubeconfig $KUBECONFIG_PATH weft-local
    }
}
COREFILE
    local coredns; coredns="$(bin_of coredns)"
    spawn coredns nsenter --net="/run/netns/$REAL_NETNS" -- "$coredns" -conf "$r/Corefile"
  fi
  local pki="$WEFT_CLUSTER_DIR/pki"
  await real-api-loopback 20 in_netns curl -sf --max-time 2 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" \
    --key "$pki/admin.key" "https://127.0.0.1:$APISERVER_PORT/readyz"
  await coredns 30 sh -c "grep -q 'CoreDNS-' '$WEFT_CLUSTER_DIR/logs/coredns.log'"
  await real-egress 30 test -S "$r/egress.sock"
}

# Gives DEVICE in the nodes' namespace the address ADDRESS, unless it has it.
real_netns_address() {
  # (grep reads all of ip's output: with -q and pipefail, a closed pipe would fail.)
  in_netns ip addr show dev "$2" | grep " $1 " >/dev/null || in_netns ip addr add "$1" dev "$2"
}

# The cgroup of a node in every v1 hierarchy (cpuset's with the parent's CPUs
# and memory nodes), or under cgroup2.
real_node_cgroups() {
  local name="$1" h
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p "/sys/fs/cgroup/$name"
    return 0
  fi
  for h in /sys/fs/cgroup/*/; do
    h="${h%/}"
    [ -d "$h" ] && [ "$(basename "$h")" != unified ] || continue
    mkdir -p "$h/$name"
    if [ -f "$h/cpuset.cpus" ]; then
      cat "$h/cpuset.cpus" > "$h/$name/cpuset.cpus"
      cat "$h/cpuset.mems" > "$h/$name/cpuset.mems"
    fi
  done
}

# Starts real node i: certificates, containerd, images, kubelet. Idempotent.
real_node_up() {
  local i="$1" name ip nd r p
  name="$(real_node_name "$i")"; ip="$(real_node_ip "$i")"; nd="$(real_node_dir "$i")"; r="$(real_dir)"
  p="$WEFT_CLUSTER_DIR/pki"
  . "$WEFT_CLUSTER_DIR/ports.env"
  mkdir -p "$nd"/{containerd/root,containerd/state,containerd/opt,cni,cni-ipam,kubelet,certs,pods,plugins,sysctl}
  real_netns_address "$ip/16" "$REAL_BRIDGE"

  cat > "$nd/containerd.toml" <<TOML
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$nd/containerd.sock"
[ttrpc]
  address = "$nd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Without CAP_SYS_RESOURCE a negative oom_score_adj cannot be set, and every
  # sandbox would fail to start.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # runc's state in the node's directory, not /run/containerd/runc.
        Root = "$nd/runc"
TOML
  cat > "$nd/cni/10-weft.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "weft-$name",
  "plugins": [{
    "type": "bridge",
    "bridge": "$REAL_BRIDGE",
    "isGateway": false,
    "ipMasq": false,
    "hairpinMode": true,
    "ipam": {
      "type": "host-local",
      "dataDir": "$nd/cni-ipam",
      "ranges": [[{"subnet": "$REAL_POD_SUBNET", "rangeStart": "10.244.$i.2", "rangeEnd": "10.244.$i.254", "gateway": "$REAL_BRIDGE_IP"}]],
      "routes": [{"dst": "$REAL_SERVICE_SUBNET"}]
    }
  }]
}
JSON

  # The node's credentials: system:node:<name> in system:nodes, signed by this
  # control plane's CA (the Node authorizer and NodeRestriction apply).
  if [ ! -f "$nd/certs/node.crt" ]; then
    (
      cd "$nd/certs"
      openssl req -newkey rsa:2048 -nodes -subj "/O=system:nodes/CN=system:node:$name" \
        -keyout node.key -out node.csr 2>/dev/null
      printf 'extendedKeyUsage=clientAuth\n' > ext
      openssl x509 -req -in node.csr -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
        -days 3650 -extfile ext -out node.crt 2>/dev/null
    ) || die "could not make the certificates of $name"
  fi
  local k; k="$(bin_of kubectl)"
  "$k" config --kubeconfig="$nd/kubeconfig" set-cluster weft-local \
    --server="https://127.0.0.1:$APISERVER_PORT" --certificate-authority="$p/ca.crt" --embed-certs >/dev/null
  "$k" config --kubeconfig="$nd/kubeconfig" set-credentials "$name" \
    --client-certificate="$nd/certs/node.crt" --client-key="$nd/certs/node.key" --embed-certs >/dev/null
  "$k" config --kubeconfig="$nd/kubeconfig" set-context node --cluster=weft-local --user="$name" >/dev/null
  "$k" config --kubeconfig="$nd/kubeconfig" use-context node >/dev/null

  printf '# Pods of weft'"'"'s real nodes resolve names through the cluster DNS only.\n' > "$nd/resolv.conf"
  cat > "$nd/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: $ip
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $p/ca.crt}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$nd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$name
failCgroupV1: false
clusterDNS: [$REAL_DNS_IP]
clusterDomain: cluster.local
resolvConf: $nd/resolv.conf
makeIPTablesUtilChains: false
podLogsDir: $nd/pods
volumePluginDir: $nd/plugins
systemReserved: {cpu: $REAL_SYSTEM_RESERVED_CPU, memory: $REAL_SYSTEM_RESERVED_MEMORY}
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
# The images are imported, never pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
failSwapOn: false
# Only pods that tolerate it run here: a pod of any other test, placed here,
# would really pull and run its image.
registerWithTaints:
- {key: $REAL_NODE_LABEL, value: "true", effect: NoSchedule}
serializeImagePulls: false
nodeStatusUpdateFrequency: 2s
YAML
  real_node_cgroups "$name"

  if ! alive "containerd-$name"; then
    spawn "containerd-$name" nsenter --net="/run/netns/$REAL_NETNS" -- containerd --config "$nd/containerd.toml"
  fi
  await "containerd-$name" 30 ctr --address "$nd/containerd.sock" version
  real_node_import "$i"

  if ! alive "kubelet-$name"; then
    # The kubelet's root is a shared mount, so the volumes it mounts in its own
    # mount namespace (tokens, ConfigMaps) reach the containers.
    if ! findmnt -n --mountpoint "$nd/kubelet" >/dev/null; then
      mount --bind "$nd/kubelet" "$nd/kubelet"
      mount --make-shared "$nd/kubelet"
    fi
    local binds="" f
    for f in $REAL_KUBELET_SYSCTLS; do
      cat "/proc/sys/$f" > "$nd/sysctl/${f//\//.}"
      binds="$binds mount --bind '$nd/sysctl/${f//\//.}' '/proc/sys/$f' &&"
    done
    local kubelet; kubelet="$(bin_of kubelet)"
    spawn "kubelet-$name" nsenter --net="/run/netns/$REAL_NETNS" -- \
      unshare --mount --propagation unchanged -- sh -c "mount --make-rslave /proc && $binds exec \"\$@\"" kubelet \
      "$kubelet" --config="$nd/kubelet.yaml" --kubeconfig="$nd/kubeconfig" \
      --root-dir="$nd/kubelet" --cert-dir="$nd/certs" --hostname-override="$name" --node-ip="$ip" \
      --node-labels="$REAL_NODE_LABEL=true" --v=1
  fi
}

# Imports the pause image and weft's images (what images/build wrote) into node
# i's containerd; an image whose tarball changed since its last import is
# imported again.
real_node_import() {
  local i="$1" nd tar stamp want version
  nd="$(real_node_dir "$i")"; version="$(weft_version)"
  # (Its own line: a pause image that cannot be made stops here.)
  local pause; pause="$(real_pause_image)"
  for tar in "$pause" "$WEFT_CACHE/images/weft-operator-$version.tar" \
             "$WEFT_CACHE/images/weft-trainer-$version.tar"; do
    if [ ! -f "$tar" ]; then
      log "$(basename "$tar") is not built: real nodes cannot run it until images/build writes it (then e2e/cluster/up --real-nodes imports it)"
      continue
    fi
    want="$(stat -c '%s %Y' "$tar")"
    stamp="$nd/imported.$(basename "$tar")"
    [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && continue
    ctr --address "$nd/containerd.sock" -n k8s.io images import "$tar" >/dev/null \
      || die "could not import $tar into $(real_node_name "$i")'s containerd"
    printf '%s' "$want" > "$stamp"
    log "imported $(basename "$tar") into $(real_node_name "$i")"
  done
}

# Starts real nodes 1..N (more than run already; none are removed), and waits
# until they are all Ready.
real_nodes_up() {
  local want="$1" i start=$SECONDS missing
  case "$want" in ''|*[!0-9]*) die "--real-nodes needs a number, not '$want'" ;; esac
  [ "$want" -le "$REAL_MAX_NODES" ] || die "--real-nodes: at most $REAL_MAX_NODES"
  [ "$want" -gt 0 ] || return 0
  missing="$(real_nodes_missing)"
  [ -z "$missing" ] || die "real nodes need what this machine lacks (nothing was changed):
$(sed 's/^/  - /' <<< "$missing")"
  real_network_up
  for i in $(seq 1 "$want"); do real_node_up "$i"; done
  for i in $(seq 1 "$want"); do
    await "kubelet-$(real_node_name "$i")" 120 kctl wait --for=condition=Ready "node/$(real_node_name "$i")" --timeout=2s
  done
  log "$want real nodes Ready ($(for i in $(seq 1 "$want"); do printf '%s ' "$(real_node_name "$i")"; done)); took $((SECONDS - start)) s"
}

# Adds N real nodes after the ones that run.
real_nodes_add() {
  local n="$1" last
  case "$n" in ''|*[!0-9]*|0) die "add-nodes --real needs a positive number, not '$n'" ;; esac
  last="$(real_node_indices | tail -n 1)"
  real_nodes_up "$(( ${last:-0} + n ))"
}

# Kills PID and every process below it, children first.
kill_tree() {
  local pid="$1" child
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do kill_tree "$child"; done
  kill -9 "$pid" 2>/dev/null || true
}

# Stops component NAME and its process group (spawn gave it one: socat's
# children, a kubelet's wrapper): TERM, then KILL after 5 s. A recorded PID
# that is no longer the component's (it died; its PID was reused) is left alone.
stop_component() {
  local pid; pid="$(pid_of "$1")"
  if [ -n "$pid" ] && alive "$1"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$1" || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$WEFT_CLUSTER_DIR/pids/$1" "$WEFT_CLUSTER_DIR/pids/$1.start"
}

# Unmounts every mount at or below DIR, deepest first.
unmount_below() {
  local dir="$1" m
  findmnt -rn -o TARGET | awk -v d="$dir" '$0 == d || index($0, d "/") == 1' | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

# Stops real node i and removes everything it made: its containers, mounts,
# cgroups and directory. Best effort: it goes on past what fails.
real_node_down() {
  local i="$1" name nd pid h id ids sockets task
  name="$(real_node_name "$i")"; nd="$(real_node_dir "$i")"
  stop_component "kubelet-$name"
  # The containers (sandboxes included), while containerd still runs: killed
  # and deleted, so their shims exit and clean up after themselves.
  task="$nd/containerd/state/io.containerd.runtime.v2.task/k8s.io"
  ids="$(ls "$task" 2>/dev/null || true)"
  # Each shim's socket, in a fixed place, named in its task's directory.
  sockets="$(cat "$task"/*/address 2>/dev/null | sed 's#^unix://##' || true)"
  if alive "containerd-$name"; then
    for id in $ids; do
      timeout 10 ctr --address "$nd/containerd.sock" -n k8s.io tasks delete --force "$id" >/dev/null 2>&1 || true
    done
  fi
  # What is left: each shim of this containerd, with what runs below it.
  for pid in $(pgrep -f "containerd-shim.* -address $nd/containerd.sock" 2>/dev/null || true); do
    kill_tree "$pid"
  done
  # CNI's cache of this node's network (named after the node), and of the
  # loopback network of each pod it ran.
  rm -f /var/lib/cni/results/weft-"$name"-* 2>/dev/null || true
  for id in $ids; do rm -f /var/lib/cni/results/*-"$id"-* 2>/dev/null || true; done
  for h in $sockets; do
    case "$h" in /run/containerd/s/*) rm -f "$h" ;; esac
  done
  stop_component "containerd-$name"
  unmount_below "$nd"
  # A killed task leaves its cgroup a moment later: try for a few seconds.
  for _ in $(seq 1 30); do
    local left=0
    for h in /sys/fs/cgroup/*/"$name" /sys/fs/cgroup/"$name"; do
      [ -d "$h" ] || continue
      find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null || true
      [ -d "$h" ] && left=1
    done
    [ "$left" = 0 ] && break
    sleep 0.2
  done
  rm -rf "$nd" 2>/dev/null || log "could not remove all of $nd"
}

# Stops every real node and the namespace, and removes what they left in the
# machine's fixed places. Safe to run when there are none.
real_nodes_down() {
  local r i c start=$SECONDS; r="$(real_dir)"
  [ -d "$r" ] || return 0
  for i in $(real_node_indices); do real_node_down "$i"; done
  for c in coredns real-egress real-api-service real-api-loopback real-api-relay; do stop_component "$c"; done
  if [ -e "/run/netns/$REAL_NETNS" ]; then ip netns delete "$REAL_NETNS" 2>/dev/null || true; fi
  # The fixed places: the kubelet's links to its nodes' logs, and those of the
  # places that did not exist before the first real node, once empty.
  find /var/log/containers -maxdepth 1 -type l -lname "$r/*" -delete 2>/dev/null || true
  for c in $REAL_FIXED_PLACES; do
    grep -qx "$c absent" "$r/host-before" 2>/dev/null || continue
    [ -d "$c" ] || continue
    if [ "$c" = /run/netns ] && [ -z "$(ls -A /run/netns)" ]; then
      umount /run/netns 2>/dev/null || true
    fi
    find "$c" -depth -type d -empty -delete 2>/dev/null || true
  done
  rm -rf "$r" 2>/dev/null || log "could not remove all of $r"
  log "real nodes stopped and removed in $((SECONDS - start)) s"
}

# What of the machine real nodes could change, as lines to compare: the
# kernel settings a kubelet writes, forwarding, and which fixed places exist.
real_host_snapshot() {
  local f
  for f in $REAL_KUBELET_SYSCTLS net/ipv4/ip_forward; do printf '%s=%s\n' "$f" "$(cat "/proc/sys/$f")"; done
  for f in $REAL_FIXED_PLACES; do
    if [ -e "$f" ]; then echo "$f exists"; else echo "$f absent"; fi
  done
  # What they hold, and the mounts there (a machine with its own containerd
  # has them already: what real nodes add shows here).
  find $REAL_FIXED_PLACES -mindepth 1 -maxdepth 3 2>/dev/null | sort || true
  findmnt -rn -o TARGET | grep -E '^/run/netns' | sort || true
  # cgroup v2: the controllers the root hands down.
  [ -f /sys/fs/cgroup/cgroup.subtree_control ] && echo "subtree_control: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
  return 0
}

# Says what real nodes left on this machine, one line each (nothing when they
# left nothing): their processes, mounts, cgroups and network namespace, and
# any difference from BEFORE (real_host_snapshot taken before they started).
real_nodes_leftovers() {
  local before="${1:-}" h
  pgrep -af "$WEFT_CLUSTER_DIR|kubelet-v[0-9]|coredns-v[0-9]" | grep -v pgrep | sed 's/^/process: /' || true
  findmnt -rn -o TARGET | grep -E "^$WEFT_CLUSTER_DIR|^/run/netns/$REAL_NETNS" | sed 's/^/mount: /' || true
  for h in /sys/fs/cgroup/*/weft-real-* /sys/fs/cgroup/weft-real-*; do
    [ -e "$h" ] && echo "cgroup: $h"
  done
  [ -e "/run/netns/$REAL_NETNS" ] && echo "network namespace: $REAL_NETNS"
  if [ -n "$before" ] && [ "$(real_host_snapshot)" != "$before" ]; then
    diff <(printf '%s\n' "$before") <(real_host_snapshot) | sed -n 's/^> /changed: /p' || true
  fi
  return 0
}

# Prints each real node's kubelet and containerd; returns non-zero when one is down.
real_nodes_status() {
  local i name rc=0 c
  for i in $(real_node_indices); do
    name="$(real_node_name "$i")"
    for c in "containerd-$name" "kubelet-$name"; do
      if alive "$c"; then printf '%-24s running  pid %s\n' "$c" "$(pid_of "$c")"
      else printf '%-24s DOWN     pid %s (log: %s)\n' "$c" "$(pid_of "$c")" "$WEFT_CLUSTER_DIR/logs/$c.log"; rc=1; fi
    done
  done
  if [ -d "$(real_dir)" ]; then
    for c in coredns real-egress real-api-service real-api-loopback real-api-relay; do
      if alive "$c"; then printf '%-24s running  pid %s\n' "$c" "$(pid_of "$c")"
      else printf '%-24s DOWN     pid %s (log: %s)\n' "$c" "$(pid_of "$c")" "$WEFT_CLUSTER_DIR/logs/$c.log"; rc=1; fi
    done
  fi
  return $rc
}
