"""The supervisor: runs in its own session and owns every process and namespace of the cluster."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.agent import netns
from controlplane_stub.cluster.relays import pipe
from controlplane_stub.cluster.state import DNS_IP, MARKER, SERVICE_CIDR, State, self_command, tool

log = logging.getLogger("kpc.cluster")


class Supervisor:
    def __init__(self, st: State, args: argparse.Namespace) -> None:
        self.st = st
        self.args = args
        self.dir = Path(st.data_dir)
        self.logs = self.dir / "logs"
        self.topo = netns.Topology(prefix=st.prefix)
        self.node_nets = [self.topo.node(i) for i in range(1, st.nodes + 1)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.specs: dict[str, list[str]] = {}
        self.relay_servers: list[asyncio.AbstractServer] = []
        self.env = dict(os.environ, **{MARKER: st.prefix, "PYTHONUNBUFFERED": "1"})
        self.stopping = False

    def progress(self, msg: str) -> None:
        with (self.dir / "progress.log").open("a") as f:
            f.write(msg + "\n")
        log.info("%s", msg)

    def spawn(self, name: str, cmd: list[str], ns: str | None = None) -> subprocess.Popen[bytes]:
        full = (["ip", "netns", "exec", ns] if ns else []) + cmd
        self.specs[name] = full
        out = (self.logs / f"{name}.log").open("ab")
        p = subprocess.Popen(
            full,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=str(self.dir),
            start_new_session=True,
        )
        out.close()
        self.procs[name] = p
        self.st.pids[name] = p.pid
        self.st.save()
        return p

    def start_apiserver(self) -> None:
        exe = tool("kproxy-apiserver")
        if exe is None:
            raise RuntimeError("kproxy-apiserver is not installed (pip install -e . in the repo)")
        ad = self.dir / "apiserver"
        ad.mkdir(exist_ok=True)
        cmd = [
            exe,
            "--data-dir",
            str(ad),
            "--secure-port",
            str(self.args.api_port),
            "--service-cluster-ip-range",
            SERVICE_CIDR,
        ]
        out = (self.logs / "apiserver.log").open("ab")
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=str(self.dir),
            start_new_session=True,
        )
        out.close()
        self.procs["apiserver"] = p
        self.st.pids["apiserver"] = p.pid
        self.st.save()
        assert p.stdout is not None
        deadline = time.monotonic() + 60
        line = b""
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                raise RuntimeError(
                    f"kproxy-apiserver exited with {p.returncode}; see {self.logs}/apiserver.log"
                )
            if b" ready url=" in line:
                break
        else:
            raise RuntimeError("kproxy-apiserver did not become ready in 60 s")
        self.st.api_url = line.decode().split("url=", 1)[1].split()[0]
        self.st.api_port = int(self.st.api_url.rsplit(":", 1)[1])
        # Keep draining its stdout into the log so it never blocks on a full pipe.
        stdout = p.stdout

        def drain() -> None:
            with (self.logs / "apiserver.log").open("ab") as f:
                for chunk in iter(lambda: stdout.readline(), b""):
                    f.write(chunk)


        threading.Thread(target=drain, daemon=True).start()
        shutil.copy(ad / "admin.kubeconfig", self.st.kubeconfig)
        self.st.components["apiserver"] = self.st.api_url
        self.st.save()

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
        c = api.Client(api.Config.from_kubeconfig(self.st.kubeconfig))
        opened: dict[int, str] = {}
        inf = api.Informer(c, "services")
        servers: dict[int, asyncio.AbstractServer] = {}

        async def on(ev: str, svc: dict[str, Any], old: dict[str, Any] | None) -> None:
            if ev == "DELETED" or svc["spec"].get("type") != "LoadBalancer":
                return
            ing = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if not ing:
                return
            ip = ing[0].get("ip")
            for p in svc["spec"].get("ports") or []:
                port = int(p["port"])
                if p.get("protocol", "TCP") != "TCP" or port in opened:
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
            s = await asyncio.to_thread(netns.socket_in, self.topo.client_ns)
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
        netns.setup_node_network(self.topo)
        for n in self.node_nets:
            netns.setup_node(self.topo, n, self.node_nets)
            self.progress(f"node {n.name}: netns {n.netns}, {n.ip} on the node network, pods {n.pod_cidr}")
        netns.setup_client(self.topo, self.node_nets, [self.st.lb_pool, SERVICE_CIDR])
        # The node network's own namespace routes pod CIDRs too (the DNS server answers from there).
        netns.ip(
            ns=self.topo.net_ns,
            batch="".join(f"route replace {n.pod_cidr} via {n.ip} dev br0\n" for n in self.node_nets)
            + "".join(f"route replace {c} via {self.node_nets[0].ip} dev br0\n" for c in (SERVICE_CIDR,)),
        )
        self.progress(
            f"client netns {self.topo.client_ns} ({self.topo.node_network_ip(2)}): routes to pods, "
            f"Services {SERVICE_CIDR} and LoadBalancer IPs {self.st.lb_pool} via the nodes"
        )

    def start_agents(self) -> None:
        for i, n in enumerate(self.node_nets, start=1):
            cmd = self_command() + [
                "_agent",
                "--kubeconfig",
                self.st.kubeconfig,
                "--prefix",
                self.st.prefix,
                "--node-index",
                str(i),
                "--data-dir",
                str(self.dir / "nodes" / n.name),
                "--zone",
                f"zone-{'abc'[(i - 1) % 3]}",
                "--backoff-base",
                str(self.args.backoff_base),
            ]
            if self.args.image_catalog:
                cmd += ["--image-catalog", self.args.image_catalog]
            if self.st.components.get("dns", "").startswith("running"):
                cmd += ["--dns-ip", DNS_IP]
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
        ro = self.dir / "apiserver" / "readonly.kubeconfig"
        kc = str(ro if ro.exists() else self.st.kubeconfig)
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
                    "--cluster-cidr",
                    self.topo.pod_cidr_base,
                    "--healthz-bind-address",
                    f"{n.ip}:10256",
                    "--metrics-bind-address",
                    "127.0.0.1:10249",
                ],
                ns=n.netns,
            )
        await asyncio.sleep(3)
        dead = [n.name for n in self.node_nets if self.procs[f"kproxy-{n.name}"].poll() is not None]
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
        ro = self.dir / "apiserver" / "readonly.kubeconfig"
        addr = self.topo.node_network_ip(1)
        self.spawn(
            "dns",
            [
                exe,
                "--kubeconfig",
                str(ro if ro.exists() else self.st.kubeconfig),
                "--dns-bind-address",
                addr,
                "--dns-port",
                "53",
                "--health-port",
                "0",
                # pods query it from their own addresses: allowed with the node network's
                "--cluster-cidr",
                self.topo.pod_cidr_base,
                "--service-cluster-ip-range",
                SERVICE_CIDR,
            ],
            ns=self.topo.net_ns,
        )
        await asyncio.sleep(1.5)
        if self.procs["dns"].poll() is not None:
            self.st.components["dns"] = f"kproxy-dns exited (see {self.logs}/dns.log)"
            self.progress(f"cluster DNS: {self.st.components['dns']}")
            return
        # kube-dns: a Service without selector whose EndpointSlice points at the DNS server.
        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
            "spec": {
                "clusterIP": DNS_IP,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        }
        es = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-kpc",
                "namespace": "kube-system",
                "labels": {
                    "kubernetes.io/service-name": "kube-dns",
                    "endpointslice.kubernetes.io/managed-by": "kproxy-cluster",
                },
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [addr], "conditions": {"ready": True, "serving": True, "terminating": False}}
            ],
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ],
        }
        for res, obj in (("services", svc), ("endpointslices", es)):
            try:
                await c.create(api.path(res, "kube-system"), obj)
            except api.ApiError as e:
                if e.code != 409:
                    raise
        self.st.components["dns"] = f"running kproxy-dns on {addr}:53, Service kube-system/kube-dns {DNS_IP}"
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
        self.progress(f"cleaning up leftovers of {self.st.prefix}* (if any)")
        netns.cleanup(self.st.prefix)
        self.progress("starting the API server")
        await asyncio.to_thread(self.start_apiserver)
        self.progress(f"API server ready at {self.st.api_url}")
        await asyncio.to_thread(self.build_network)
        for ns in [n.netns for n in self.node_nets] + [self.topo.client_ns, self.topo.net_ns]:
            await self.relay(ns, self.st.api_port)
        self.progress("API server reachable at the same URL inside every node netns (socket relay)")
        c = api.Client(api.Config.from_kubeconfig(self.st.kubeconfig))
        self.spawn(
            "controllers",
            self_command()
            + ["_controllers", "--kubeconfig", self.st.kubeconfig, "--lb-pool", self.st.lb_pool],
        )
        self.st.components["controllers"] = (
            "endpointslice, deployment, replicaset, scheduler, loadbalancer, gc"
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
        """Restarts a crashed agent, controller manager, kproxy or DNS (with backoff)."""
        restarts: dict[str, int] = {}
        while not self.stopping:
            await asyncio.sleep(1)
            for name, p in list(self.procs.items()):
                if p.poll() is None or name == "apiserver" or self.stopping:
                    continue
                n = restarts[name] = restarts.get(name, 0) + 1
                if n > 5:
                    continue
                log.warning("component=%s exited rc=%s; restart #%d", name, p.returncode, n)
                await asyncio.sleep(min(2**n, 30))
                spec = self.specs[name]
                ns = spec[3] if spec[:3] == ["ip", "netns", "exec"] else None
                self.spawn(name, spec[4:] if ns else spec, ns=ns)

    def stop_all(self) -> None:
        self.stopping = True
        for s in self.relay_servers:
            s.close()
        order = (
            [k for k in self.procs if k.startswith("kproxy")]
            + [k for k in self.procs if k.startswith("agent")]
            + [k for k in self.procs if k in ("controllers", "dns")]
            + ["apiserver"]
        )
        for name in order:
            p = self.procs.get(name)
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
        netns.cleanup(self.st.prefix)


def cmd_supervise(args: argparse.Namespace) -> int:
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
