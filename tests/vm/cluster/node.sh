#!/usr/bin/env bash
# One node of the VM cluster bed, run as the COMMAND of a User-Mode Linux VM (tests/vm/run --net)
# from the repository's root:
#   node.sh ROLE INDEX NODES MODE SERVER_IP CLUSTER_DIR
# The VM's eth0 is its card on the bed's bridge. The node is provisioned by vagrant/provision.sh
# with the steps that need neither network nor systemd, as Vagrant runs it (as root, with the
# Vagrantfile's arguments); then the units it wrote are started by units.py, which stands in for
# systemd, until the host creates CLUSTER_DIR/stop.
set -euo pipefail
ROLE=$1 INDEX=$2 NODES=$3 MODE=$4 SERVER_IP=$5 CLUSTER_DIR=$6
REPO=$(pwd)
NODE_IP=10.250.0.$((10 + INDEX))
LOGS=$CLUSTER_DIR/logs/node-$INDEX
mkdir -p "$LOGS"
exec 2> >(tee -a "$LOGS/node.sh.log" >&2)
hostname "node-$INDEX"
ip addr add "$NODE_IP/24" dev eth0
# provision.sh's `kproxy` step (pip install, network) made /opt/kproxy/venv; here the checkout's
# own virtualenv stands in for it.
mkdir -p /opt/kproxy
ln -sfn "$REPO/.venv" /opt/kproxy/venv
bash "$REPO/vagrant/provision.sh" --role "$ROLE" --node-ip "$NODE_IP" --server-ip "$SERVER_IP" \
  --repo "$REPO" --proxy-mode "$MODE" --nodes "$NODES" --cluster-dir "$CLUSTER_DIR" \
  --steps kernel,network,units
units=(kproxy-node-agent kproxy)
[ "$ROLE" = server ] && units=(kproxy-apiserver kproxy-controllers kproxy-dns "${units[@]}")
echo "node-$INDEX provisioned" >&2
exec /opt/kproxy/venv/bin/python "$REPO/tests/vm/cluster/units.py" --logs "$LOGS" \
  --until "$CLUSTER_DIR/stop" "${units[@]}"
