"""meta.k8s.io/v1 Table responses with the columns kubectl prints (pkg/printers/internalversion).

Like the real server, every row carries all columns, the -o wide ones included (priority 1);
kubectl hides those unless asked. Cells are rendered at request time: AGE is the time since
creationTimestamp in kubectl's short form (5s, 3m2s, 2d).
"""
from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]
Column = tuple[str, str, int, str]  # name, type, priority, description

NAME_DOC = ("Name must be unique within a namespace. Is required when creating resources, although some resources "
            "may allow a client to request the generation of an appropriate name automatically. Name is primarily "
            "intended for creation idempotence and configuration definition. Cannot be updated. More info: "
            "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names")
AGE_DOC = ("CreationTimestamp is a timestamp representing the server time when this object was created. It is not "
           "guaranteed to be set in happens-before order across separate operations. Clients may not set this "
           "value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null "
           "for lists. More info: "
           "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata")


# --- kubectl's duration and timestamp rendering ----------------------------------------------------

def human_duration(seconds: float) -> str:
    """apimachinery's duration.HumanDuration: the AGE column's format."""
    secs = int(seconds)
    if secs < -1:
        return "<invalid>"
    if secs < 0:
        return "0s"
    if secs < 120:
        return f"{secs}s"
    minutes = secs // 60
    if minutes < 10:
        s = secs % 60
        return f"{minutes}m" if s == 0 else f"{minutes}m{s}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = secs // 3600
    if hours < 8:
        m = minutes % 60
        return f"{hours}h" if m == 0 else f"{hours}h{m}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        h = hours % 24
        return f"{hours // 24}d" if h == 0 else f"{hours // 24}d{h}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        dy = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if dy == 0 else f"{hours // 24 // 365}y{dy}d"
    return f"{hours // 24 // 365}y"


def parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def since(value: Any, now: float) -> str:
    ts = parse_time(value)
    return "<unknown>" if ts is None else human_duration(now - ts)


# --- helpers ---------------------------------------------------------------------------------------

def _d(value: Any) -> Obj:
    return value if isinstance(value, dict) else {}


def _l(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def format_labels(labels: Any) -> str:
    if not isinstance(labels, dict) or not labels:
        return "<none>"
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def format_selector(sel: Any) -> str:
    """metav1.LabelSelectorAsSelector(sel).String()."""
    if not isinstance(sel, dict):
        return "<none>"
    parts: list[tuple[str, str]] = [(k, f"{k}={v}") for k, v in _d(sel.get("matchLabels")).items()]
    for expr in _l(sel.get("matchExpressions")):
        expr = _d(expr)
        key, op = str(expr.get("key", "")), expr.get("operator")
        values = ",".join(sorted(str(v) for v in _l(expr.get("values"))))
        text = {"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": key,
                "DoesNotExist": f"!{key}"}.get(str(op), key)
        parts.append((key, text))
    if not parts:
        return "<none>"
    return ",".join(text for _, text in sorted(parts))


def _more(items: list[str], limit: int = 3) -> str:
    if len(items) > limit:
        return ",".join(items[:limit]) + f" + {len(items) - limit} more..."
    return ",".join(items)


# --- per-resource printers -------------------------------------------------------------------------

Printer = Callable[[Obj, float], list[Any]]


def _pod_row(pod: Obj, now: float) -> list[Any]:
    spec, status, meta = _d(pod.get("spec")), _d(pod.get("status")), _d(pod.get("metadata"))
    reason = str(status.get("reason") or status.get("phase") or "")
    total = len(_l(spec.get("containers")))
    ready = 0
    restarts = 0
    last_restart: float | None = None
    initializing = False
    init_statuses = _l(status.get("initContainerStatuses"))
    for i, cs in enumerate(init_statuses):
        cs = _d(cs)
        state = _d(cs.get("state"))
        restarts += int(cs.get("restartCount") or 0)
        terminated, waiting = _d(state.get("terminated")), _d(state.get("waiting"))
        if terminated and terminated.get("exitCode") == 0:
            continue
        if terminated:
            reason = "Init:" + (str(terminated.get("reason") or "") or f"ExitCode:{terminated.get('exitCode')}")
        elif waiting.get("reason") and waiting.get("reason") != "PodInitializing":
            reason = "Init:" + str(waiting["reason"])
        else:
            reason = f"Init:{i}/{len(init_statuses)}"
        initializing = True
        break
    if not initializing:
        restarts = 0
        has_running = False
        for cs in reversed(_l(status.get("containerStatuses"))):
            cs = _d(cs)
            restarts += int(cs.get("restartCount") or 0)
            finished = parse_time(_d(_d(cs.get("lastState")).get("terminated")).get("finishedAt"))
            if finished is not None and (last_restart is None or finished > last_restart):
                last_restart = finished
            state = _d(cs.get("state"))
            waiting, term = _d(state.get("waiting")), state.get("terminated")
            if waiting.get("reason"):
                reason = str(waiting["reason"])
            elif isinstance(term, dict) and term.get("reason"):
                reason = str(term["reason"])
            elif isinstance(term, dict):
                signal = term.get("signal")
                reason = f"Signal:{signal}" if signal else f"ExitCode:{term.get('exitCode', 0)}"
            elif cs.get("ready") and "running" in state:
                has_running = True
                ready += 1
        if reason == "Completed" and has_running:
            conditions = {_d(c).get("type"): _d(c).get("status") for c in _l(status.get("conditions"))}
            reason = "Running" if conditions.get("Ready") == "True" else "NotReady"
    if meta.get("deletionTimestamp"):
        if status.get("reason") == "NodeLost":
            reason = "Unknown"
        elif status.get("phase") not in ("Succeeded", "Failed"):
            reason = "Terminating"
    restarts_text = str(restarts)
    if restarts and last_restart is not None:
        restarts_text = f"{restarts} ({human_duration(now - last_restart)} ago)"
    ips = [_d(p).get("ip") for p in _l(status.get("podIPs"))]
    pod_ip = (ips[0] if ips else status.get("podIP")) or "<none>"
    gates = [_d(g).get("conditionType") for g in _l(spec.get("readinessGates"))]
    if gates:
        conditions = {_d(c).get("type"): _d(c).get("status") for c in _l(status.get("conditions"))}
        gates_text = f"{sum(conditions.get(g) == 'True' for g in gates)}/{len(gates)}"
    else:
        gates_text = "<none>"
    return [f"{ready}/{total}", reason, restarts_text, since(meta.get("creationTimestamp"), now), pod_ip,
            spec.get("nodeName") or "<none>", status.get("nominatedNodeName") or "<none>", gates_text]


def _lb_ingress(status: Obj) -> list[str]:
    out = []
    for ing in _l(_d(status.get("loadBalancer")).get("ingress")):
        ing = _d(ing)
        if ing.get("ip"):
            out.append(str(ing["ip"]))
        elif ing.get("hostname"):
            out.append(str(ing["hostname"]))
    return out


def _service_row(svc: Obj, now: float) -> list[Any]:
    spec, meta = _d(svc.get("spec")), _d(svc.get("metadata"))
    svc_type = str(spec.get("type") or "ClusterIP")
    external_ips = [str(ip) for ip in _l(spec.get("externalIPs"))]
    if svc_type == "ExternalName":
        external = str(spec.get("externalName") or "<none>")
    elif svc_type == "LoadBalancer":
        lb = _lb_ingress(_d(svc.get("status"))) + external_ips
        external = ",".join(lb) if lb else "<pending>"
    else:
        external = ",".join(external_ips) if external_ips else "<none>"
    ports = []
    for p in _l(spec.get("ports")):
        p = _d(p)
        protocol = p.get("protocol") or "TCP"
        ports.append(f"{p.get('port')}:{p['nodePort']}/{protocol}" if p.get("nodePort") else
                     f"{p.get('port')}/{protocol}")
    return [svc_type, spec.get("clusterIP") or "<none>", external, ",".join(ports) or "<none>",
            since(meta.get("creationTimestamp"), now), format_labels(spec.get("selector"))]


def _containers_images(template: Obj) -> tuple[str, str]:
    containers = [_d(c) for c in _l(_d(template.get("spec")).get("containers"))]
    return ",".join(str(c.get("name", "")) for c in containers), ",".join(str(c.get("image", "")) for c in containers)


def _deployment_row(d: Obj, now: float) -> list[Any]:
    spec, status, meta = _d(d.get("spec")), _d(d.get("status")), _d(d.get("metadata"))
    names, images = _containers_images(_d(spec.get("template")))
    desired = spec.get("replicas", 1)
    return [f"{int(status.get('readyReplicas') or 0)}/{desired}", int(status.get("updatedReplicas") or 0),
            int(status.get("availableReplicas") or 0), since(meta.get("creationTimestamp"), now), names, images,
            format_selector(spec.get("selector"))]


def _replicaset_row(rs: Obj, now: float) -> list[Any]:
    spec, status, meta = _d(rs.get("spec")), _d(rs.get("status")), _d(rs.get("metadata"))
    names, images = _containers_images(_d(spec.get("template")))
    return [int(spec.get("replicas", 1) or 0), int(status.get("replicas") or 0), int(status.get("readyReplicas") or 0),
            since(meta.get("creationTimestamp"), now), names, images, format_selector(spec.get("selector"))]


def _daemonset_row(ds: Obj, now: float) -> list[Any]:
    spec, status, meta = _d(ds.get("spec")), _d(ds.get("status")), _d(ds.get("metadata"))
    names, images = _containers_images(_d(spec.get("template")))
    node_selector = _d(_d(_d(spec.get("template")).get("spec")).get("nodeSelector"))
    counts = [int(status.get(k) or 0) for k in ("desiredNumberScheduled", "currentNumberScheduled", "numberReady",
                                                 "updatedNumberScheduled", "numberAvailable")]
    return [*counts, format_labels(node_selector) if node_selector else "<none>",
            since(meta.get("creationTimestamp"), now), names, images, format_selector(spec.get("selector"))]


def _node_row(node: Obj, now: float) -> list[Any]:
    spec, status, meta = _d(node.get("spec")), _d(node.get("status")), _d(node.get("metadata"))
    conditions = {_d(c).get("type"): _d(c).get("status") for c in _l(status.get("conditions"))}
    ready = conditions.get("Ready")
    state = "Ready" if ready == "True" else ("NotReady" if ready == "False" else "Unknown")
    if spec.get("unschedulable"):
        state += ",SchedulingDisabled"
    roles = sorted(k.split("/", 1)[1] for k in _d(meta.get("labels")) if k.startswith("node-role.kubernetes.io/"))
    if _d(meta.get("labels")).get("kubernetes.io/role"):
        roles.append(str(meta["labels"]["kubernetes.io/role"]))
    addresses = {_d(a).get("type"): _d(a).get("address") for a in _l(status.get("addresses"))}
    info = _d(status.get("nodeInfo"))
    return [state, ",".join(sorted(set(roles))) or "<none>", since(meta.get("creationTimestamp"), now),
            info.get("kubeletVersion", ""), addresses.get("InternalIP") or "<none>",
            addresses.get("ExternalIP") or "<none>", info.get("osImage") or "<unknown>",
            info.get("kernelVersion") or "<unknown>", info.get("containerRuntimeVersion") or "<unknown>"]


def _namespace_row(ns: Obj, now: float) -> list[Any]:
    return [_d(ns.get("status")).get("phase", ""), since(_d(ns.get("metadata")).get("creationTimestamp"), now)]


def _endpoints_row(ep: Obj, now: float) -> list[Any]:
    items: list[str] = []
    for subset in _l(ep.get("subsets")):
        subset = _d(subset)
        ports = [_d(p).get("port") for p in _l(subset.get("ports"))] or [None]
        for addr in _l(subset.get("addresses")):
            for port in ports:
                ip = _d(addr).get("ip", "")
                items.append(f"{ip}:{port}" if port is not None else str(ip))
    return [_more(items) or "<none>", since(_d(ep.get("metadata")).get("creationTimestamp"), now)]


def _endpointslice_row(eps: Obj, now: float) -> list[Any]:
    ports = [str(_d(p).get("port")) for p in _l(eps.get("ports")) if _d(p).get("port") is not None]
    addresses = [str(a) for e in _l(eps.get("endpoints")) for a in _l(_d(e).get("addresses"))]
    return [eps.get("addressType", ""), ",".join(ports) or "<unset>", _more(addresses) or "<unset>",
            since(_d(eps.get("metadata")).get("creationTimestamp"), now)]


def _configmap_row(cm: Obj, now: float) -> list[Any]:
    return [len(_d(cm.get("data"))) + len(_d(cm.get("binaryData"))),
            since(_d(cm.get("metadata")).get("creationTimestamp"), now)]


def _secret_row(s: Obj, now: float) -> list[Any]:
    return [s.get("type", "Opaque"), len(_d(s.get("data"))), since(_d(s.get("metadata")).get("creationTimestamp"), now)]


def _event_row(ev: Obj, now: float) -> list[Any]:
    involved = _d(ev.get("involvedObject"))
    first = ev.get("firstTimestamp") or ev.get("eventTime")
    last = ev.get("lastTimestamp") or first
    count = ev.get("count") or 1
    series = _d(ev.get("series"))
    if series:
        last = series.get("lastObservedTime") or last
        count = series.get("count") or count
    kind = str(involved.get("kind", "")).lower()
    target = f"{kind}/{involved['name']}" if involved.get("name") else kind
    source = _d(ev.get("source"))
    src = str(source.get("component") or ev.get("reportingComponent") or "")
    if source.get("host"):
        src += f", {source['host']}"
    return [since(last, now), ev.get("type", ""), ev.get("reason", ""), target, involved.get("fieldPath", ""),
            src, str(ev.get("message", "")).strip(), since(first, now), int(count),
            _d(ev.get("metadata")).get("name", "")]


def _lease_row(lease: Obj, now: float) -> list[Any]:
    return [_d(lease.get("spec")).get("holderIdentity", ""), since(_d(lease.get("metadata")).get("creationTimestamp"),
                                                                   now)]


def _servicecidr_row(sc: Obj, now: float) -> list[Any]:
    cidrs = ",".join(c for c in _l(_d(sc.get("spec")).get("cidrs")) if isinstance(c, str))
    return [cidrs, since(_d(sc.get("metadata")).get("creationTimestamp"), now)]


def _generic_row(obj: Obj, now: float) -> list[Any]:
    return [since(_d(obj.get("metadata")).get("creationTimestamp"), now)]


_AGE: Column = ("Age", "string", 0, AGE_DOC)
_CONTAINERS: Column = ("Containers", "string", 1, "Names of each container in the template.")
_IMAGES: Column = ("Images", "string", 1, "Images referenced by each container in the template.")
_SELECTOR: Column = ("Selector", "string", 1, "Label selector for pods. Existing ReplicaSets whose pods are selected "
                                              "by this will be the ones affected by this deployment.")

TABLES: dict[str, tuple[list[Column], Printer]] = {
    "pods": ([("Ready", "string", 0, "The aggregate readiness state of this pod for accepting traffic."),
              ("Status", "string", 0, "The aggregate status of the containers in this pod."),
              ("Restarts", "string", 0, "The number of times the containers in this pod have been restarted and when "
                                        "the last container in this pod has restarted."),
              _AGE,
              ("IP", "string", 1, "podIP address allocated to the pod. Routable at least within the cluster."),
              ("Node", "string", 1, "NodeName is a request to schedule this pod onto a specific node."),
              ("Nominated Node", "string", 1, "nominatedNodeName is set only when this pod preempts other pods on "
                                              "the node."),
              ("Readiness Gates", "string", 1, "If specified, all readiness gates will be evaluated for pod "
                                               "readiness.")], _pod_row),
    "services": ([("Type", "string", 0, "type determines how the Service is exposed."),
                  ("Cluster-IP", "string", 0, "clusterIP is the IP address of the service."),
                  ("External-IP", "string", 0, "externalIPs is a list of IP addresses for which nodes in the cluster "
                                               "will also accept traffic for this service."),
                  ("Port(s)", "string", 0, "The list of ports that are exposed by this service."),
                  _AGE,
                  ("Selector", "string", 1, "Route service traffic to pods with label keys and values matching this "
                                            "selector.")], _service_row),
    "deployments.apps": ([("Ready", "string", 0, "Number of the pod with ready state"),
                          ("Up-to-date", "integer", 0, "Total number of non-terminated pods targeted by this "
                                                       "deployment that have the desired template spec."),
                          ("Available", "integer", 0, "Total number of available pods (ready for at least "
                                                      "minReadySeconds) targeted by this deployment."),
                          _AGE, _CONTAINERS, _IMAGES, _SELECTOR], _deployment_row),
    "replicasets.apps": ([("Desired", "integer", 0, "Replicas is the number of desired replicas."),
                          ("Current", "integer", 0, "Replicas is the most recently observed number of replicas."),
                          ("Ready", "integer", 0, "The number of ready replicas for this replica set."),
                          _AGE, _CONTAINERS, _IMAGES, _SELECTOR], _replicaset_row),
    "daemonsets.apps": ([("Desired", "integer", 0, "The total number of nodes that should be running the daemon "
                                                   "pod."),
                         ("Current", "integer", 0, "The number of nodes running at least one daemon pod and are "
                                                   "supposed to."),
                         ("Ready", "integer", 0, "The number of nodes that should be running the daemon pod and "
                                                 "have one or more of the daemon pod running and ready."),
                         ("Up-to-date", "integer", 0, "The total number of nodes that are running updated daemon "
                                                      "pod."),
                         ("Available", "integer", 0, "The number of nodes that should be running the daemon pod "
                                                     "and have one or more of the daemon pod running and available."),
                         ("Node Selector", "string", 0, "NodeSelector is a selector which must be true for the pod "
                                                        "to fit on a node."),
                         _AGE, _CONTAINERS, _IMAGES, _SELECTOR], _daemonset_row),
    "nodes": ([("Status", "string", 0, "The status of the node"),
               ("Roles", "string", 0, "The roles of the node"),
               _AGE,
               ("Version", "string", 0, "Kubelet Version reported by the node."),
               ("Internal-IP", "string", 1, "List of addresses reachable to the node."),
               ("External-IP", "string", 1, "List of addresses reachable to the node."),
               ("OS-Image", "string", 1, "OS Image reported by the node from /etc/os-release."),
               ("Kernel-Version", "string", 1, "Kernel Version reported by the node from 'uname -r'."),
               ("Container-Runtime", "string", 1, "ContainerRuntime Version reported by the node.")], _node_row),
    "namespaces": ([("Status", "string", 0, "The status of the namespace"), _AGE], _namespace_row),
    "endpoints": ([("Endpoints", "string", 0, "Endpoints of the resource"), _AGE], _endpoints_row),
    "endpointslices.discovery.k8s.io": ([("AddressType", "string", 0, "addressType specifies the type of address "
                                                                      "carried by this EndpointSlice."),
                                         ("Ports", "string", 0, "ports specifies the list of network ports exposed."),
                                         ("Endpoints", "string", 0, "endpoints is a list of unique endpoints in this "
                                                                    "slice."),
                                         _AGE], _endpointslice_row),
    "configmaps": ([("Data", "integer", 0, "Data contains the configuration data."), _AGE], _configmap_row),
    "secrets": ([("Type", "string", 0, "Used to facilitate programmatic handling of secret data."),
                 ("Data", "integer", 0, "Data contains the secret data."), _AGE], _secret_row),
    "events": ([("Last Seen", "string", 0, "The time at which the most recent occurrence of this event was recorded."),
                ("Type", "string", 0, "Type of this event (Normal, Warning), new types could be added in the future"),
                ("Reason", "string", 0, "This should be a short, machine understandable string that gives the reason "
                                        "for the transition into the object's current status."),
                ("Object", "string", 0, "The object that this event is about."),
                ("Subobject", "string", 1, "If referring to a piece of an object instead of an entire object, this "
                                           "string should contain a valid JSON/Go field access statement."),
                ("Source", "string", 1, "The component reporting this event."),
                ("Message", "string", 0, "A human-readable description of the status of this operation."),
                ("First Seen", "string", 1, "The time at which the event was first recorded."),
                ("Count", "string", 1, "The number of times this event has occurred."),
                ("Name", "string", 1, NAME_DOC)], _event_row),
    "leases.coordination.k8s.io": ([("Holder", "string", 0, "holderIdentity contains the identity of the holder of "
                                                            "a current lease."), _AGE], _lease_row),
    "servicecidrs.networking.k8s.io": ([("CIDRs", "string", 0, "CIDRs defines the IP blocks in CIDR notation (e.g. "
                                                               "\"192.168.0.0/24\" or \"2001:db8::/64\") from which to "
                                                               "assign service cluster IPs. Max of two CIDRs is allowed, "
                                                               "one of each IP family. This field is immutable."),
                                        _AGE], _servicecidr_row),
}


def _column(name: str, typ: str, priority: int, description: str, fmt: str = "") -> Obj:
    return {"name": name, "type": typ, "format": fmt, "description": description, "priority": priority}


def _row_object(obj: Obj, include_object: str) -> Obj | None:
    if include_object == "None":
        return None
    if include_object == "Object":
        return obj
    meta = {k: v for k, v in _d(obj.get("metadata")).items() if k != "managedFields"}
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}


def to_table(resource: str, objects: list[dict[str, Any]], include_object: str = "Metadata",
             now: float | None = None) -> dict[str, Any]:
    """A Table of objects with kubectl's columns for resource (a NAME/AGE table for others).

    include_object is the request's includeObject: "None", "Metadata" (the default:
    PartialObjectMetadata) or "Object". now (epoch seconds) fixes the clock for AGE cells.
    """
    clock = time.time() if now is None else now
    columns, printer = TABLES.get(resource, ([_AGE], _generic_row))
    # Events lead with Last Seen; their Name is a wide column, as kubectl prints them.
    lead_name = resource != "events"
    definitions = ([_column("Name", "string", 0, NAME_DOC, "name")] if lead_name else []) + \
        [_column(*c, fmt="name" if c[0] == "Name" else "") for c in columns]
    rows = []
    for obj in objects:
        cells = printer(obj, clock)
        if lead_name:
            cells = [_d(obj.get("metadata")).get("name", ""), *cells]
        row: Obj = {"cells": cells}
        partial = _row_object(obj, include_object)
        if partial is not None:
            row["object"] = partial
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "columnDefinitions": definitions,
            "rows": rows}
