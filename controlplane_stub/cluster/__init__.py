"""kproxy-cluster: a Kubernetes cluster on one machine, made of network namespaces and processes.

    kproxy-cluster up --nodes 3 --proxy-mode iptables     start it (returns when it is ready)
    kproxy-cluster status | down | kubeconfig
    kproxy-cluster exec -- curl http://LB_IP:6000          run a command in the outside client netns
    kproxy-cluster demo                                    up + the seed app + curl, until Ctrl-C

`up` starts a supervisor process that owns the cluster: the API server (kproxy-apiserver), the
controllers, one node agent per node, one kproxy per node (inside the node's netns), the cluster
DNS, and socket relays that let the node namespaces reach the API server at the same
https://127.0.0.1:PORT as the host does (no rules or routes in the root namespace). The
supervisor restarts any of them that exits, with the kubelet's crash-loop back-off. Every netns
and process is written to the cluster's record (DATA/owned.jsonl) as it is made, and processes
carry this `up`'s KPC_CLUSTER marker, so `down` removes exactly what the cluster made, also after
a crash.

Modules: state (state.json, paths), supervisor (the supervisor and its components), relays,
components (the controllers and node agents run from this entry point), cli (the commands and the
parser), demo. The node side lives in controlplane_stub/agent (netns, pods, podinit, security,
record, backoff).
"""

from controlplane_stub.cluster.cli import main

__all__ = ["main"]
