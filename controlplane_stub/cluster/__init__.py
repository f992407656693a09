"""kproxy-cluster: a Kubernetes cluster on one machine, made of network namespaces and processes.

    kproxy-cluster up --nodes 3 --proxy-mode iptables     start it (returns when it is ready)
    kproxy-cluster status | down | kubeconfig
    kproxy-cluster exec -- curl http://LB_IP:6000          run a command in the outside client netns
    kproxy-cluster demo                                    up + the seed app + curl, until Ctrl-C

`up` starts a supervisor process that owns the cluster: the API server (kproxy-apiserver), the
controllers, one node agent per node, one kproxy per node (inside the node's netns), the cluster
DNS, and socket relays that let the node namespaces reach the API server at the same
https://127.0.0.1:PORT as the host does (no rules or routes in the root namespace). Every netns
and process carries the cluster's name prefix (netns names) or the KPC_CLUSTER environment marker
(processes), so `down` finds and removes everything, also after a crash.
"""

from controlplane_stub.cluster.cli import main

__all__ = ["main"]
