#!/usr/bin/env bash
# Provisions one node of the vagrant cluster: kernel (IPVS modules, sysctls), packages, kproxy,
# systemd units (API server on the server node; kproxy --proxy-mode ipvs on every node), and the
# seed app. Idempotent. Steps can be picked with --steps (tests run the ones that work offline):
#   kernel    load ip_vs + schedulers, nf_conntrack, dummy; sysctls IPVS mode needs
#   packages  apt-get install (network)
#   kproxy    venv + pip install -e the repo (network)
#   units     write systemd units and the kubeconfig into --root (default /)
#   start     systemctl enable --now the units
#   seed      kubectl apply the seed app (server node)
#   check     IPVS answers through netlink and ipvsadm sees kproxy's table
set -euo pipefail

ROLE=node NODE_IP="" SERVER_IP="" REPO=/vagrant ROOT=/ STEPS="kernel,packages,kproxy,units,start,seed,check"
while [ $# -gt 0 ]; do
  case "$1" in
    --role) ROLE=$2; shift 2 ;;
    --node-ip) NODE_IP=$2; shift 2 ;;
    --server-ip) SERVER_IP=$2; shift 2 ;;
    --repo) REPO=$2; shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    *) echo "provision.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
case "$ROLE" in server|node) ;; *) echo "provision.sh: --role must be server or node, got '$ROLE'" >&2; exit 2 ;; esac
[ -n "$NODE_IP" ] || NODE_IP=$(ip -4 -o route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' || true)
[ -n "$SERVER_IP" ] || SERVER_IP=$NODE_IP
VENV=/opt/kproxy/venv
DATA=/var/lib/kproxy
log() { printf '[provision %s] %s\n' "$ROLE" "$*" >&2; }
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

IPVS_MODULES=(ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_sh ip_vs_sed ip_vs_nq ip_vs_dh nf_conntrack dummy)

step_kernel() {
  for m in "${IPVS_MODULES[@]}"; do modprobe "$m" || { log "cannot load kernel module $m"; exit 1; }; done
  mkdir -p "$ROOT/etc/modules-load.d" "$ROOT/etc/sysctl.d"
  printf '%s\n' "${IPVS_MODULES[@]}" > "$ROOT/etc/modules-load.d/kproxy-ipvs.conf"
  cat > "$ROOT/etc/sysctl.d/90-kproxy-ipvs.conf" <<SYSCTL
net.ipv4.ip_forward = 1
net.ipv4.vs.conntrack = 1
net.ipv4.vs.expire_nodest_conn = 1
net.ipv4.vs.expire_quiescent_template = 1
SYSCTL
  sysctl -q -p "$ROOT/etc/sysctl.d/90-kproxy-ipvs.conf"
}

step_packages() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends ipvsadm ipset iptables conntrack kmod iproute2 \
    python3 python3-venv python3-dev build-essential curl >/dev/null
}

step_kproxy() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel "Cython>=3.0"
  "$VENV/bin/pip" install -q -e "$REPO" --no-build-isolation
  (cd "$REPO" && "$VENV/bin/python" setup.py -q build_ext --inplace >/dev/null)
}

step_units() {
  local units="$ROOT/etc/systemd/system"
  mkdir -p "$units" "$ROOT$DATA"
  if [ "$ROLE" = server ]; then
    # --advertise-address: the kubernetes Service's endpoint must be the private-network IP the
    # nodes reach, not the default route's source (Vagrant's NAT interface) that 0.0.0.0 would pick.
    cat > "$units/kproxy-apiserver.service" <<UNIT
[Unit]
Description=kproxy control plane (Kubernetes API on SQLite)
After=network-online.target

[Service]
ExecStart=$VENV/bin/kproxy-apiserver --data-dir $DATA/apiserver --bind-address 0.0.0.0 --advertise-address $SERVER_IP --secure-port 6443 --tls-san $SERVER_IP
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
  fi
  # Every node reads the kubeconfig the server wrote into the synced folder.
  cat > "$units/kproxy.service" <<UNIT
[Unit]
Description=kproxy (kube-proxy reimplementation) in IPVS mode
After=network-online.target

[Service]
ExecStartPre=/bin/sh -c 'for i in \$(seq 60); do [ -s $REPO/.vagrant-cluster/kubeconfig ] && exit 0; sleep 2; done; exit 1'
ExecStart=$VENV/bin/kproxy --proxy-mode ipvs --kubeconfig $REPO/.vagrant-cluster/kubeconfig --master https://$SERVER_IP:6443 --hostname-override $(hostname) --nodeport-addresses $NODE_IP/32 --iptables-backend legacy --ipvs-scheduler rr
ExecStopPost=$VENV/bin/kproxy --proxy-mode ipvs --cleanup
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
}

step_start() {
  systemctl daemon-reload
  if [ "$ROLE" = server ]; then
    systemctl enable --now kproxy-apiserver.service
    for _ in $(seq 60); do [ -s "$DATA/apiserver/admin.kubeconfig" ] && break; sleep 1; done
    mkdir -p "$REPO/.vagrant-cluster"
    cp "$DATA/apiserver/admin.kubeconfig" "$REPO/.vagrant-cluster/kubeconfig"
  fi
  systemctl enable --now kproxy.service
}

step_seed() {
  [ "$ROLE" = server ] || return 0
  command -v kubectl >/dev/null || { log "no kubectl: apply $REPO/examples/seed/flask-kubernetes.yaml yourself"; return 0; }
  kubectl --kubeconfig "$REPO/.vagrant-cluster/kubeconfig" apply -f "$REPO/examples/seed/flask-kubernetes.yaml"
}

step_check() {
  "${PYTHON:-$VENV/bin/python}" - <<'PY'
from kproxy.backends.ipvs import IPVS
with IPVS() as ipvs:
    print(f"IPVS reachable over netlink: {len(ipvs.services())} virtual servers")
PY
  ipvsadm -Ln >/dev/null
}

for s in kernel packages kproxy units start seed check; do
  if want "$s"; then log "step $s"; "step_$s"; fi
done
log "done"
