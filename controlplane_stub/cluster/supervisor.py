"""The supervisor: runs in its own session and owns every process and namespace of the cluster.

Every process it starts (the API server included) is a supervised Component: when one exits it is
started again after the kubelet's crash-loop back-off (agent/backoff.py; the delays come from
`up --backoff-base/--backoff-cap/--backoff-reset`), with one log line per exit and per restart and
its state (running or back-off, since when, restarts, last exit code) published in state.json for
`status`. Every process and namespace is written to the cluster's record first (agent/record.py).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.agent import netns
from controlplane_stub.agent.backoff import CrashLoopBackoff
from controlplane_stub.cluster import identities
from controlplane_stub.cluster.etcd import etcd_control_plane
from controlplane_stub.cluster.relays import pipe
from controlplane_stub.cluster.state import (
    DNS_IP,
    DNS_IP6,
    MARKER,
    SERVICE_CIDR,
    SERVICE_CIDR6,
    State,
    lb_routes,
    node_zone,
    per_family,
    self_command,
    tool,
)

log = logging.getLogger("kpc.cluster")


@dataclass
class Component:
    """One supervised process: what to run, and what happened to it."""

    name: str
    argv: list[str]
    backoff: CrashLoopBackoff
    proc: subprocess.Popen[bytes] | None = None
    state: str = "starting"  # running | backoff | stopped
    since: float = field(default_factory=time.time)
    started: float = 0.0  # monotonic, of the current run
    restarts: int = 0
    last_exit: int | None = None
    next_start: float = 0.0  # monotonic, while in back-off

    def view(self) -> dict[str, Any]:
        v: dict[str, Any] = {
            "state": self.state,
            "since": round(self.since, 3),
            "restarts": self.restarts,
            "pid": self.proc.pid if self.proc is not None else 0,
            "last_exit": self.last_exit,
        }
        if self.state == "backoff":
            v["next_start"] = round(time.time() + max(0.0, self.next_start - time.monotonic()), 3)
        return v


class Supervisor:
    def __init__(self, st: State, args: argparse.Namespace) -> None:
        self.st = st
        self.args = args
        self.dir = Path(st.data_dir)
        self.logs = self.dir / "logs"
        self.topo = netns.Topology(prefix=st.prefix, ip_family=st.ip_family)
        # Per family of the cluster, primary first: the Service CIDRs and kube-dns's ClusterIPs.
        self.service_cidrs = per_family(st.ip_family, SERVICE_CIDR, SERVICE_CIDR6)
        self.dns_ips = per_family(st.ip_family, DNS_IP, DNS_IP6)
        self.node_nets = [self.topo.node(i) for i in range(1, st.nodes + 1)]
        self.comps: dict[str, Component] = {}
        self.record = st.record
        self.relay_servers: list[asyncio.AbstractServer] = []
        self.env = dict(os.environ, **{MARKER: st.marker, "PYTHONUNBUFFERED": "1"})
        self.stopping = False
        # user -> kubeconfig of each component's own identity (identities.py), once the API is up.
        self.identity: dict[str, str] = {}

    def backoff(self) -> CrashLoopBackoff:
        a = self.args
        return CrashLoopBackoff(a.backoff_base, max(a.backoff_cap, a.backoff_base), a.backoff_reset)

    def exited(self, name: str) -> bool:
        c = self.comps.get(name)
        return c is None or c.proc is None or c.proc.poll() is not None

    def publish(self) -> None:
        self.st.supervised = {n: c.view() for n, c in self.comps.items()}
        self.st.pids = {n: c.proc.pid for n, c in self.comps.items() if c.proc is not None}
        self.st.save()

    def progress(self, msg: str) -> None:
        with (self.dir / "progress.log").open("a") as f:
            f.write(msg + "\n")
        log.info("%s", msg)

    def spawn(self, name: str, cmd: list[str], ns: str | None = None) -> subprocess.Popen[bytes]:
        full = (["ip", "netns", "exec", ns] if ns else []) + cmd
        comp = self.comps[name] = Component(name, full, self.backoff())
        return self._start(comp)

    def _start(self, comp: Component) -> subprocess.Popen[bytes]:
        with (self.logs / f"{comp.name}.log").open("ab") as out:
            p = subprocess.Popen(
                comp.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=str(self.dir),
                start_new_session=True,
            )
        self.record.process(comp.name, p.pid)
        comp.proc, comp.state, comp.since, comp.started = p, "running", time.time(), time.monotonic()
        if comp.restarts:  # logged before state.json says so: whoever sees the state finds the line
            log.warning("component=%s restarted pid=%d (restart #%d)", comp.name, p.pid, comp.restarts)
        self.publish()
        return p

    def start_apiserver(self) -> None:
        ad = self.dir / "apiserver"
        ad.mkdir(mode=0o700, exist_ok=True)
        identities.write_token_file(ad, [n.name for n in self.node_nets])
        url = self.spawn_apiserver("apiserver", ad, self.args.api_port)
        self.st.api_url = url
        self.st.api_port = int(url.rsplit(":", 1)[1])
        shutil.copy(ad / "admin.kubeconfig", self.st.kubeconfig)
        os.chmod(self.st.kubeconfig, 0o600)
        self.st.components["apiserver"] = self.st.api_url
        self.publish()

    def kubelet_token(self) -> str:
        """The file of the token the API servers show to the node agents' logs/exec endpoint."""
        f = self.dir / "kubelet-token"
        if not f.exists():
            f.write_text(secrets.token_urlsafe(32))
            os.chmod(f, 0o600)
        return str(f)

    def spawn_apiserver(self, name: str, ad: Path, port: int, extra: list[str] | None = None) -> str:
        """Start kproxy-apiserver as the component name with data dir ad; its URL once ready."""
        exe = tool("kproxy-apiserver")
        if exe is None:
            raise RuntimeError("kproxy-apiserver is not installed (pip install -e . in the repo)")
        logf = self.logs / f"{name}.log"
        offset = logf.stat().st_size if logf.exists() else 0
        cmd = [exe, "--data-dir", str(ad), "--secure-port", str(port), "--kubelet-token-file", self.kubelet_token()]
        p = self.spawn(name, cmd + ["--service-cluster-ip-range", ",".join(self.service_cidrs), *(extra or [])])
        deadline = time.monotonic() + 60
        url = ""
        while not url and time.monotonic() < deadline:
            with logf.open("rb") as f:
                f.seek(offset)
                for line in f.read().splitlines():
                    if b" ready url=" in line:
                        url = line.decode(errors="replace").split("url=", 1)[1].split()[0]
            if not url and p.poll() is not None:
                raise RuntimeError(f"kproxy-apiserver exited with {p.returncode}; see {logf}")
            time.sleep(0.1)
        if not url:
            raise RuntimeError("kproxy-apiserver did not become ready in 60 s")
        # A restart must come back on the same port: the kubeconfigs and the relays point at it.
        argv = self.comps[name].argv
        argv[argv.index("--secure-port") + 1] = url.rsplit(":", 1)[1]
        return url

    async def relay(self, ns: str, port: int) -> None:
        """127.0.0.1:port inside ns -> 127.0.0.1:port of the host (where the API server listens)."""
        sock = await asyncio.to_thread(netns.listener_in, ns, "127.0.0.1", port)

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                w.close()
                return
            await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)

        self.relay_servers.append(await asyncio.start_server(handle, sock=sock))

    async def lb_relays(self) -> None:
        """Docker Desktop style: each LoadBalancer Service port on localhost:PORT of the host,
        relayed with sockets into the client netns (which routes LB IPs to the nodes)."""
        c = api.Client(api.load_kubeconfig(self.st.kubeconfig))
        opened: dict[int, str] = {}
        inf = api.Informer(c, "services")
        servers: dict[int, asyncio.AbstractServer] = {}

        async def on(ev: str, svc: dict[str, Any], old: dict[str, Any] | None) -> None:
            if ev == "DELETED" or svc["spec"].get("type") != "LoadBalancer":
                return
            ing = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if not ing:
                return
            try:  # what the API says is input: an IP and ports 1-65535, or this Service is skipped
                # the first ingress IP, IPv4 preferred (a dual-stack Service has one of each family)
                ips = [ipaddress.ip_address(str(i.get("ip"))) for i in ing]
                ip = str(min(ips, key=lambda a: a.version))
                ports = [
                    int(p["port"])
                    for p in svc["spec"].get("ports") or []
                    if p.get("protocol", "TCP") == "TCP"
                ]
                if not all(0 < x < 65536 for x in ports):
                    raise ValueError(f"port out of range in {ports}")
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                log.warning("localhost LoadBalancer relay: Service skipped: %s", e)
                return
            for port in ports:
                if port in opened:
                    continue
                opened[port] = ip
                try:
                    servers[port] = await asyncio.start_server(self._lb_handler(ip, port), "127.0.0.1", port)
                    self.progress(f"localhost:{port} -> {svc['metadata']['name']} LoadBalancer {ip}:{port}")
                except OSError as e:
                    log.warning("localhost:%d for %s: %s", port, svc["metadata"]["name"], e)

        inf.add_handler(on)
        await inf.run()

    def _lb_handler(self, ip: str, port: int) -> Any:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            loop = asyncio.get_running_loop()
            s = await asyncio.to_thread(netns.socket_in, self.topo.client_ns, netns.family_of(ip))
            s.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(s, (ip, port)), 5)
                ur, uw = await asyncio.open_connection(sock=s)
            except (TimeoutError, OSError):
                s.close()
                w.close()
                return
            await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)

        return handle

    def build_network(self) -> None:
        netns.setup_node_network(self.topo, self.record)
        for n in self.node_nets:
            netns.setup_node(self.topo, n, self.node_nets, self.record)
            self.progress(
                f"node {n.name}: netns {n.netns}, {', '.join(n.all_ips)} on the node network, "
                f"pods {', '.join(n.all_pod_cidrs)}"
            )
        # The LoadBalancer pool as routes (one per range, each family via the nodes' address of it).
        lb = lb_routes(self.st.lb_pool)
        netns.setup_client(self.topo, self.node_nets, lb + self.service_cidrs, self.record)
        # The node network's own namespace routes pod CIDRs too (the DNS server answers from there).
        first = self.node_nets[:1]
        netns.ip(
            ns=self.topo.net_ns,
            batch="".join(netns.routes_to_pods(self.node_nets, "br0"))
            + "".join(netns.route_over_nodes(c, first, "br0") for c in self.service_cidrs),
        )
        self.progress(
            f"client netns {self.topo.client_ns} ({', '.join(self.topo.node_network_ips(2))}): routes to pods, "
            f"Services {', '.join(self.service_cidrs)} and LoadBalancer IPs {', '.join(lb)} via the nodes"
        )

    def start_agents(self) -> None:
        for i, n in enumerate(self.node_nets, start=1):
            cmd = self_command() + [
                "_agent",
                "--kubeconfig",
                self.identity.get(identities.node_user(n.name), self.st.kubeconfig),
                "--prefix",
                self.st.prefix,
                "--ip-family",
                self.st.ip_family,
                "--node-index",
                str(i),
                "--data-dir",
                str(self.dir / "nodes" / n.name),
                "--zone",
                node_zone(i, self.args.zones),
                "--backoff-base",
                str(self.args.backoff_base),
                "--backoff-cap",
                str(self.args.backoff_cap),
                "--backoff-reset",
                str(self.args.backoff_reset),
                "--record",
                str(self.record.path),
                "--hide-path",
                str(self.dir),
                "--kubelet-token-file",
                self.kubelet_token(),
            ]
            if self.args.image_catalog:
                cmd += ["--image-catalog", self.args.image_catalog]
            if self.st.components.get("dns", "").startswith("running"):
                cmd += ["--dns-ip", self.dns_ips[0]]
            self.spawn(f"agent-{n.name}", cmd)
        self.st.components["agents"] = f"{len(self.node_nets)} node agents"

    def probe_kproxy(self) -> str:
        exe = tool("kproxy")
        if exe is None:
            return "kproxy: not available yet (not installed)"
        r = subprocess.run(
            [exe, "--proxy-mode", self.st.proxy_mode, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(self.dir),
        )
        if r.returncode != 0:
            return f"kproxy: not available yet ({(r.stderr or r.stdout).strip().splitlines()[-1:]})"
        return ""

    async def start_kproxies(self) -> None:
        why = await asyncio.to_thread(self.probe_kproxy)
        if why:
            self.st.components["kproxy"] = why
            self.progress(why)
            return
        kc = self.identity.get(identities.KPROXY_USER, self.st.kubeconfig)
        exe = tool("kproxy") or "kproxy"
        for i, n in enumerate(self.node_nets):
            self.spawn(
                f"kproxy-{n.name}",
                [
                    exe,
                    "--proxy-mode",
                    self.st.proxy_mode,
                    "--kubeconfig",
                    kc,
                    "--hostname-override",
                    n.name,
                    # one per family (kube-proxy's dual-stack form)
                    "--cluster-cidr",
                    ",".join(self.topo.pod_cidr_bases),
                    "--healthz-bind-address",
                    f"[{n.ip}]:10256" if ":" in n.ip else f"{n.ip}:10256",
                    "--metrics-bind-address",
                    "127.0.0.1:10249",
                ],
                ns=n.netns,
            )
        await asyncio.sleep(3)
        dead = [n.name for n in self.node_nets if self.exited(f"kproxy-{n.name}")]
        if dead:
            msg = f"exited on {', '.join(dead)} (see {self.logs}/kproxy-NODE.log)"
        else:
            msg = f"running --proxy-mode {self.st.proxy_mode} on {len(self.node_nets)} nodes"
        self.st.components["kproxy"] = msg
        self.progress(f"kproxy: {msg}")

    async def start_dns(self, c: api.Client) -> None:
        exe = tool("kproxy-dns")
        if exe is None:
            self.st.components["dns"] = "kproxy-dns: not available yet"
            self.progress("cluster DNS: kproxy-dns not available yet; pods use the host's resolv.conf")
            return
        kc = await identities.dns_kubeconfig(c, self.dir, self.st.kubeconfig)
        addrs = self.topo.node_network_ips(1)
        # With IPv6 one socket on "::" answers both families (IPv4 clients as v4-mapped sources).
        bind = addrs[0] if len(addrs) == 1 and ":" not in addrs[0] else "::"
        self.spawn(
            "dns",
            [
                exe,
                "--kubeconfig",
                kc,
                "--dns-bind-address",
                bind,
                "--dns-port",
                "53",
                "--health-port",
                "0",
                # pods query it from their own addresses: allowed with the node network's
                "--cluster-cidr",
                ",".join(self.topo.pod_cidr_bases),
                "--service-cluster-ip-range",
                ",".join(self.service_cidrs),
            ],
            ns=self.topo.net_ns,
        )
        await asyncio.sleep(1.5)
        if self.exited("dns"):
            self.st.components["dns"] = f"kproxy-dns exited (see {self.logs}/dns.log)"
            self.progress(f"cluster DNS: {self.st.components['dns']}")
            return
        # kube-dns: a Service without selector whose EndpointSlices (one per family) point at the
        # DNS server; in a dual-stack cluster the Service has a ClusterIP of each family.
        dual = len(self.dns_ips) > 1
        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
            "spec": {
                "clusterIP": self.dns_ips[0],
                "clusterIPs": self.dns_ips,
                "ipFamilyPolicy": "RequireDualStack" if dual else "SingleStack",
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        }
        slices = [
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"kube-dns-kpc{'-v6' if ':' in addr else ''}",
                    "namespace": "kube-system",
                    "labels": {
                        "kubernetes.io/service-name": "kube-dns",
                        "endpointslice.kubernetes.io/managed-by": "kproxy-cluster",
                    },
                },
                "addressType": "IPv6" if ":" in addr else "IPv4",
                "endpoints": [
                    {"addresses": [addr], "conditions": {"ready": True, "serving": True, "terminating": False}}
                ],
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            }
            for addr in addrs
        ]
        for res, obj in [("services", svc)] + [("endpointslices", e) for e in slices]:
            try:
                await c.create(api.path(res, "kube-system"), obj)
            except api.ApiError as e:
                if e.code != 409:
                    raise
        self.st.components["dns"] = (
            f"running kproxy-dns on {', '.join(addrs)} port 53, Service kube-system/kube-dns {', '.join(self.dns_ips)}"
        )
        self.progress(f"cluster DNS: {self.st.components['dns']}")

    async def wait_nodes_ready(self, c: api.Client, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes, _ = await c.list(api.path("nodes"))
            ready = [
                n
                for n in nodes
                if any(
                    x["type"] == "Ready" and x["status"] == "True"
                    for x in (n.get("status") or {}).get("conditions") or []
                )
            ]
            if len(ready) >= len(self.node_nets):
                return
            await asyncio.sleep(0.3)
        raise RuntimeError(f"nodes not Ready after {timeout:.0f} s; see {self.logs}/agent-*.log")

    async def run(self) -> None:
        t0 = time.monotonic()
        if getattr(self.args, "store", "sqlite") == "etcd":
            await etcd_control_plane(self, self.args.apiservers)
        else:
            self.progress("starting the API server")
            await asyncio.to_thread(self.start_apiserver)
            self.progress(f"API server ready at {self.st.api_url}")
        await asyncio.to_thread(self.build_network)
        for ns in [n.netns for n in self.node_nets] + [self.topo.client_ns, self.topo.net_ns]:
            await self.relay(ns, self.st.api_port)
        self.progress("API server reachable at the same URL inside every node netns (socket relay)")
        c = api.Client(api.load_kubeconfig(self.st.kubeconfig))
        first = self.dir / ("apiserver-0" if (self.dir / "apiserver-0").exists() else "apiserver")
        self.identity = identities.component_kubeconfigs(self.dir, first / "tokens.csv", self.st.kubeconfig)
        controllers_kc = self.identity.get(identities.CONTROLLERS_USER, self.st.kubeconfig)
        self.spawn(
            "controllers",
            self_command() + ["_controllers", "--kubeconfig", controllers_kc, "--lb-pool", self.st.lb_pool],
        )
        self.st.components["controllers"] = (
            "endpointslice, deployment, replicaset, daemonset, scheduler, loadbalancer, gc"
        )
        self.progress("controllers started")
        if self.args.dns:
            await self.start_dns(c)
        self.start_agents()
        await self.wait_nodes_ready(c)
        self.progress(f"{len(self.node_nets)} nodes Ready")
        if self.st.proxy_mode != "none":
            await self.start_kproxies()
        relay_task = asyncio.create_task(self.lb_relays()) if self.args.localhost_lb else None
        self.st.ready = True
        self.st.save()
        self.progress(f"READY in {time.monotonic() - t0:.1f} s")
        try:
            await self.watch_children()
        finally:
            if relay_task:
                relay_task.cancel()
            await c.close()

    async def watch_children(self) -> None:
        """Restarts every component that exits, the API server too, after its back-off."""
        while not self.stopping:
            await asyncio.sleep(0.25)
            self.check_children()

    def check_children(self) -> None:
        now = time.monotonic()
        for comp in list(self.comps.values()):
            if self.stopping:
                return
            p = comp.proc
            if comp.state == "running" and p is not None and p.poll() is not None:
                ran = now - comp.started
                delay = comp.backoff.after_exit(ran)
                comp.state, comp.since, comp.last_exit = "backoff", time.time(), p.returncode
                comp.next_start = now + delay
                log.warning(
                    "component=%s pid=%d exited rc=%s after %.1f s; restart #%d in %.1f s (crash-loop back-off)",
                    comp.name,
                    p.pid,
                    p.returncode,
                    ran,
                    comp.restarts + 1,
                    delay,
                )
                self.publish()
            if comp.state == "backoff" and now >= comp.next_start:
                comp.restarts += 1
                try:
                    self._start(comp)
                except OSError as e:  # could not even start: counts as an exit at once
                    comp.proc, comp.last_exit, comp.state, comp.since = None, None, "backoff", time.time()
                    comp.next_start = now + comp.backoff.after_exit(0.0)
                    log.error("component=%s restart #%d failed: %s", comp.name, comp.restarts, e)
                    self.publish()
                    continue

    def stop_all(self) -> None:
        self.stopping = True
        for s in self.relay_servers:
            s.close()
        order = (
            [k for k in self.comps if k.startswith("kproxy")]
            + [k for k in self.comps if k.startswith("agent")]
            + [k for k in self.comps if k in ("controllers", "dns")]
            + [k for k in self.comps if k.startswith("apiserver")]
            + [k for k in self.comps if k.startswith("etcd")]
        )
        for name in order:
            comp = self.comps.get(name)
            p = comp.proc if comp is not None else None
            if comp is not None:
                comp.state, comp.since = "stopped", time.time()
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(8)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        # kproxy's rules (iptables/nft chains, IPVS services, ipsets) live inside the node namespaces,
        # so removing the namespaces removes them: no `kproxy --cleanup` pass is needed.
        netns.remove_owned(self.record.load())
        self.publish()


def cmd_supervise(args: argparse.Namespace) -> int:
    os.umask(0o077)  # every file of the cluster (logs, kubeconfigs, the API server's) is the owner's only
    st = State.load(Path(args.data_dir))
    assert st is not None, f"{args.data_dir}/state.json missing"
    st.supervisor_pid = os.getpid()  # (cmd_up writes it too, but this copy is the one saved from now on)
    st.save()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sup = Supervisor(st, args)
    loop = asyncio.new_event_loop()
    main_task = loop.create_task(sup.run())

    def on_signal() -> None:
        sup.stopping = True
        main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    rc = 0
    try:
        loop.run_until_complete(main_task)
    except asyncio.CancelledError:
        pass
    except Exception as e:
        sup.progress(f"FAILED: {e}")
        log.exception("supervisor failed")
        rc = 1
    finally:
        sup.progress("stopping")
        sup.stop_all()
        st.ready = False
        st.supervisor_pid = 0
        st.save()
        sup.progress("STOPPED")
    return rc
