#!/usr/bin/env bash
# Provisions one node of the vagrant cluster: kernel (IPVS modules, sysctls), packages, kproxy,
# the node's pod network, systemd units (server node: API server, controllers, cluster DNS; every
# node: the node agent and kproxy) and the seed app. Idempotent. Steps can be picked with --steps
# (tests/vm/cluster runs the ones that work offline and without systemd, in User-Mode Linux VMs):
#   kernel    load ip_vs + schedulers, nf_conntrack, dummy, bridge/br_netfilter, veth; sysctls
#   packages  apt-get install (network)
#   kproxy    venv + pip install -e the repo (network)
#   network   the pod bridge cbr0 (this node's pod CIDR), routes to the other nodes' pod CIDRs,
#             and the name the node agent uses for the node's network namespace (the host's own)
#   units     write the systemd units and their helper scripts into --root (default /)
#   start     systemctl enable --now the units
#   seed      kube-dns and the seed app, then curl it through its LoadBalancer IP (last node)
#   check     IPVS answers through netlink and ipvsadm sees kproxy's table (--proxy-mode ipvs)
set -euo pipefail

ROLE=node NODE_IP="" SERVER_IP="" REPO=/vagrant ROOT=/ STEPS="kernel,packages,kproxy,network,units,start,seed,check"
MODE=ipvs NODES=3 NODE_INDEX="" CLUSTER_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --role) ROLE=$2; shift 2 ;;
    --node-ip) NODE_IP=$2; shift 2 ;;
    --server-ip) SERVER_IP=$2; shift 2 ;;
    --repo) REPO=$2; shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --proxy-mode) MODE=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --node-index) NODE_INDEX=$2; shift 2 ;;
    --cluster-dir) CLUSTER_DIR=$2; shift 2 ;;
    *) echo "provision.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
case "$ROLE" in server|node) ;; *) echo "provision.sh: --role must be server or node, got '$ROLE'" >&2; exit 2 ;; esac
case "$MODE" in ipvs|iptables) ;; *) echo "provision.sh: --proxy-mode must be ipvs or iptables, got '$MODE'" >&2; exit 2 ;; esac
case "$NODES" in ''|*[!0-9]*|0) echo "provision.sh: --nodes must be a positive number, got '$NODES'" >&2; exit 2 ;; esac
[ -n "$NODE_IP" ] || NODE_IP=$(ip -4 -o route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' || true)
[ -n "$SERVER_IP" ] || SERVER_IP=$NODE_IP
# The node agent derives a node's name, address and pod CIDR from its index on the node network
# 10.250.0.0/24 (node-I at 10.250.0.(10+I), pods 10.244.I.0/24), as the one-machine cluster does.
NET=10.250.0
[ -n "$NODE_INDEX" ] || NODE_INDEX=$(( ${NODE_IP##*.} - 10 ))
case "$NODE_INDEX" in ''|*[!0-9]*|0) echo "provision.sh: --node-index must be a positive number, got '$NODE_INDEX'" >&2; exit 2 ;; esac
if [ "$NODE_IP" != "$NET.$((10 + NODE_INDEX))" ]; then
  echo "provision.sh: node $NODE_INDEX must have the address $NET.$((10 + NODE_INDEX)) (the node agent's node network), got '$NODE_IP'" >&2
  exit 2
fi
NODE_NAME=node-$NODE_INDEX
PREFIX=kpc-
POD_CIDR_BASE=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/12
DNS_IP=10.96.0.10
LB_POOL=10.251.0.0/24
[ -n "$CLUSTER_DIR" ] || CLUSTER_DIR=$REPO/.vagrant-cluster   # shared by the nodes: the kubeconfig
KUBECONFIG_FILE=$CLUSTER_DIR/kubeconfig
VENV=/opt/kproxy/venv
BIN=/opt/kproxy/bin
DATA=/var/lib/kproxy
log() { printf '[provision %s] %s\n' "$ROLE" "$*" >&2; }
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

IPVS_MODULES=(ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh ip_vs_sed ip_vs_nq ip_vs_dh nf_conntrack dummy)
POD_MODULES=(bridge br_netfilter veth)

step_kernel() {
  for m in "${IPVS_MODULES[@]}" "${POD_MODULES[@]}"; do
    modprobe "$m" || { log "cannot load kernel module $m"; exit 1; }
  done
  mkdir -p "$ROOT/etc/modules-load.d" "$ROOT/etc/sysctl.d"
  printf '%s\n' "${IPVS_MODULES[@]}" > "$ROOT/etc/modules-load.d/kproxy-ipvs.conf"
  printf '%s\n' "${POD_MODULES[@]}" > "$ROOT/etc/modules-load.d/kproxy-pods.conf"
  # bridge-nf-call-iptables: a pod reaching a Service backed by a pod on the same bridge must pass
  # through the node's NAT rules; route_localnet: NodePorts on 127.0.0.1 in iptables mode.
  cat > "$ROOT/etc/sysctl.d/90-kproxy-ipvs.conf" <<SYSCTL
net.ipv4.ip_forward = 1
net.ipv4.vs.conntrack = 1
net.ipv4.vs.expire_nodest_conn = 1
net.ipv4.vs.expire_quiescent_template = 1
net.bridge.bridge-nf-call-iptables = 1
net.ipv4.conf.all.route_localnet = 1
SYSCTL
  sysctl -q -p "$ROOT/etc/sysctl.d/90-kproxy-ipvs.conf"
}

step_packages() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends ipvsadm ipset iptables conntrack kmod iproute2 \
    python3 python3-venv python3-dev build-essential curl kubernetes-client >/dev/null
}

step_kproxy() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel "Cython>=3.0"
  "$VENV/bin/pip" install -q -e "$REPO[controlplane,dns,demo]" --no-build-isolation
  (cd "$REPO" && "$VENV/bin/python" setup.py -q build_ext --inplace >/dev/null)
}

step_network() {
  # The node agent runs pods as network namespaces on the bridge cbr0 of "the node's namespace",
  # which it finds by name (${PREFIX}nI); on a real node that is the host's own namespace, so the
  # name is attached to PID 1's.
  local gw=10.244.$NODE_INDEX.1
  [ -e "/run/netns/${PREFIX}n$NODE_INDEX" ] || ip netns attach "${PREFIX}n$NODE_INDEX" 1
  if ! ip link show cbr0 >/dev/null 2>&1; then
    ip link add cbr0 type bridge
    ip addr add "$gw/24" dev cbr0
  fi
  ip link set cbr0 up
  local j
  for j in $(seq "$NODES"); do
    [ "$j" = "$NODE_INDEX" ] || ip route replace "10.244.$j.0/24" via "$NET.$((10 + j))"
  done
}

write_helpers() {
  mkdir -p "$ROOT$BIN"
  # Every node waits for the kubeconfig the server publishes into the cluster directory.
  cat > "$ROOT$BIN/kproxy-wait-kubeconfig" <<SH
#!/bin/sh
for i in \$(seq 120); do [ -s $KUBECONFIG_FILE ] && exit 0; sleep 1; done
echo "no kubeconfig at $KUBECONFIG_FILE after 120 s (is the server node up?)" >&2; exit 1
SH
  # The server's admin kubeconfig names 127.0.0.1; the nodes reach the server at its node IP.
  cat > "$ROOT$BIN/kproxy-publish-kubeconfig" <<SH
#!/bin/sh
set -e
for i in \$(seq 120); do [ -s $DATA/apiserver/admin.kubeconfig ] && break; sleep 0.5; done
mkdir -p $CLUSTER_DIR
sed 's#server: https://127.0.0.1:6443#server: https://$SERVER_IP:6443#' $DATA/apiserver/admin.kubeconfig > $KUBECONFIG_FILE.tmp
mv $KUBECONFIG_FILE.tmp $KUBECONFIG_FILE
SH
  chmod +x "$ROOT$BIN/kproxy-wait-kubeconfig" "$ROOT$BIN/kproxy-publish-kubeconfig"
}

step_units() {
  local units="$ROOT/etc/systemd/system"
  mkdir -p "$units" "$ROOT$DATA"
  write_helpers
  if [ "$ROLE" = server ]; then
    # --advertise-address: the kubernetes Service's endpoint must be the private-network IP the
    # nodes reach, not the default route's source (Vagrant's NAT interface) that 0.0.0.0 would pick.
    cat > "$units/kproxy-apiserver.service" <<UNIT
[Unit]
Description=kproxy control plane (Kubernetes API on SQLite)
After=network-online.target

[Service]
ExecStart=$VENV/bin/kproxy-apiserver --data-dir $DATA/apiserver --bind-address 0.0.0.0 --advertise-address $SERVER_IP --secure-port 6443 --tls-san $SERVER_IP --service-cluster-ip-range $SERVICE_CIDR
ExecStartPost=$BIN/kproxy-publish-kubeconfig
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
    cat > "$units/kproxy-controllers.service" <<UNIT
[Unit]
Description=kproxy control plane controllers (deployments, scheduler, endpoint slices, nodes, LoadBalancer IPs)
After=kproxy-apiserver.service

[Service]
ExecStartPre=$BIN/kproxy-wait-kubeconfig
TimeoutStartSec=180
ExecStart=$VENV/bin/kproxy-cluster _controllers --kubeconfig $KUBECONFIG_FILE --lb-pool $LB_POOL
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
    cat > "$units/kproxy-dns.service" <<UNIT
[Unit]
Description=kproxy-dns (cluster DNS) on the server's node IP, Service kube-system/kube-dns $DNS_IP
After=kproxy-apiserver.service

[Service]
ExecStartPre=$BIN/kproxy-wait-kubeconfig
TimeoutStartSec=180
ExecStart=$VENV/bin/kproxy-dns --kubeconfig $KUBECONFIG_FILE --dns-bind-address $SERVER_IP --dns-port 53 --health-port 8080
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
  fi
  cat > "$units/kproxy-node-agent.service" <<UNIT
[Unit]
Description=kproxy node agent (registers $NODE_NAME, runs its pods as network namespaces)
After=network-online.target

[Service]
ExecStartPre=$BIN/kproxy-wait-kubeconfig
TimeoutStartSec=180
ExecStart=$VENV/bin/kproxy-cluster _agent --kubeconfig $KUBECONFIG_FILE --prefix $PREFIX --node-index $NODE_INDEX --data-dir $DATA/agent --dns-ip $DNS_IP
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
  cat > "$units/kproxy.service" <<UNIT
[Unit]
Description=kproxy (kube-proxy reimplementation) in $MODE mode
After=network-online.target

[Service]
ExecStartPre=$BIN/kproxy-wait-kubeconfig
TimeoutStartSec=180
ExecStart=$VENV/bin/kproxy --proxy-mode $MODE --kubeconfig $KUBECONFIG_FILE --master https://$SERVER_IP:6443 --hostname-override $NODE_NAME --cluster-cidr $POD_CIDR_BASE --nodeport-addresses $NODE_IP/32 --iptables-backend legacy --ipvs-scheduler rr
ExecStopPost=$VENV/bin/kproxy --proxy-mode $MODE --cleanup
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
}

step_start() {
  systemctl daemon-reload
  if [ "$ROLE" = server ]; then
    systemctl enable --now kproxy-apiserver.service kproxy-controllers.service kproxy-dns.service
  fi
  systemctl enable --now kproxy-node-agent.service kproxy.service
}

# kube-dns: a Service without selector whose EndpointSlice points at the server's kproxy-dns.
kube_dns_manifest() {
  cat <<YAML
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_IP
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-server
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: provision.sh}
addressType: IPv4
endpoints:
- addresses: [$SERVER_IP]
  conditions: {ready: true, serving: true, terminating: false}
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
YAML
}

step_seed() {
  # On the last node: Vagrant provisions the nodes one after the other, so the seed app's pods
  # spread over all of them only once the last one is up.
  [ "$NODE_INDEX" = "$NODES" ] || return 0
  command -v kubectl >/dev/null || { log "no kubectl: apply $REPO/examples/seed/flask-kubernetes.yaml yourself"; return 0; }
  for _ in $(seq 120); do [ -s "$KUBECONFIG_FILE" ] && break; sleep 1; done
  kube_dns_manifest | kubectl --kubeconfig "$KUBECONFIG_FILE" apply -f -
  kubectl --kubeconfig "$KUBECONFIG_FILE" apply -f "$REPO/examples/seed/flask-kubernetes.yaml"
  kubectl --kubeconfig "$KUBECONFIG_FILE" rollout status deployment/flask-kubernetes --timeout 180s
  local ip=""
  for _ in $(seq 60); do
    ip=$(kubectl --kubeconfig "$KUBECONFIG_FILE" get svc flask-kubernetes-service \
         -o jsonpath='{.status.loadBalancer.ingress[0].ip}')
    [ -n "$ip" ] && curl -s -m 3 "http://$ip:6000" && return 0
    sleep 2
  done
  log "the seed app did not answer through its LoadBalancer IP '$ip'"; exit 1
}

step_check() {
  [ "$MODE" = ipvs ] || return 0
  "${PYTHON:-$VENV/bin/python}" - <<'PY'
from kproxy.backends.ipvs import IPVS
with IPVS() as ipvs:
    print(f"IPVS reachable over netlink: {len(ipvs.services())} virtual servers")
PY
  ipvsadm -Ln >/dev/null
}

for s in kernel packages kproxy network units start seed check; do
  if want "$s"; then log "step $s"; "step_$s"; fi
done
log "done"
