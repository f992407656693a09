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

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.agent import netns

log = logging.getLogger("kpc.cluster")
MARKER = "KPC_CLUSTER"
REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "examples" / "seed" / "flask-kubernetes.yaml"
DNS_IP = "10.96.0.10"
SERVICE_CIDR = "10.96.0.0/12"


def default_data_dir(name: str) -> Path:
    base = os.environ.get("KPROXY_CLUSTER_HOME") or os.path.expanduser("~/.kproxy-cluster")
    return Path(base) / name


def self_command() -> list[str]:
    script = Path(sys.executable).parent / "kproxy-cluster"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from controlplane_stub.cluster import main; sys.exit(main())"]


def tool(name: str) -> str | None:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else shutil.which(name)


@dataclass
class State:
    name: str
    prefix: str
    data_dir: str
    nodes: int
    proxy_mode: str
    lb_pool: str
    api_port: int = 0
    api_url: str = ""
    supervisor_pid: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)
    ready: bool = False

    @property
    def path(self) -> Path:
        return Path(self.data_dir) / "state.json"

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.path)

    @staticmethod
    def load(data_dir: Path) -> State | None:
        try:
            return State(**json.loads((data_dir / "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    @property
    def kubeconfig(self) -> str:
        return str(Path(self.data_dir) / "kubeconfig")


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def marked_pids(prefix: str) -> list[int]:
    """Processes started for this cluster (they carry KPC_CLUSTER=prefix in their environment)."""
    want = f"{MARKER}={prefix}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if want in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


# ---------------------------------------------------------------------------------------------
# The supervisor: runs in its own session and owns every process and namespace of the cluster.
# ---------------------------------------------------------------------------------------------
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

        import threading

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


async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        if r.at_eof():
            w.close()


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


# ---------------------------------------------------------------------------------------------
# Components started by the supervisor
# ---------------------------------------------------------------------------------------------
def cmd_controllers(args: argparse.Namespace) -> int:
    from controlplane_stub.controllers.manager import ControllerManager, ControllerOptions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def run() -> None:
        async with api.Client(api.Config.from_kubeconfig(args.kubeconfig), user_agent="kpc-controllers") as c:
            await ControllerManager(
                c,
                ControllerOptions(lb_pool=args.lb_pool, max_endpoints_per_slice=args.max_endpoints_per_slice),
            ).run()

    return _run_until_signal(run())


def cmd_agent(args: argparse.Namespace) -> int:
    from controlplane_stub.agent.node import AgentConfig, NodeAgent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    topo = netns.Topology(prefix=args.prefix)
    node = topo.node(args.node_index)
    cfg = AgentConfig(
        node=node,
        prefix=args.prefix,
        data_dir=Path(args.data_dir),
        catalog_file=args.image_catalog,
        zone=args.zone,
        dns_ip=args.dns_ip,
        backoff_base=args.backoff_base,
    )

    async def run() -> None:
        async with api.Client(
            api.Config.from_kubeconfig(args.kubeconfig), user_agent=f"kpc-agent/{node.name}"
        ) as c:
            await NodeAgent(c, cfg).run()

    return _run_until_signal(run())


def _run_until_signal(coro: Any) -> int:
    loop = asyncio.new_event_loop()
    task = loop.create_task(coro)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        return 0
    return 0


# ---------------------------------------------------------------------------------------------
# User commands
# ---------------------------------------------------------------------------------------------
def _state(args: argparse.Namespace) -> State | None:
    return State.load(Path(args.data_dir))


def cmd_up(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("kproxy-cluster up: needs root (network namespaces); rerun with sudo", file=sys.stderr)
        return 1
    d = Path(args.data_dir)
    old = State.load(d)
    if old and alive(old.supervisor_pid):
        print(
            f"cluster {old.name} is already up (supervisor pid {old.supervisor_pid}); "
            f"`kproxy-cluster down --name {old.name}` first",
            file=sys.stderr,
        )
        return 1
    if args.nodes < 1 or args.nodes > 200:
        print("--nodes: between 1 and 200", file=sys.stderr)
        return 2
    # Every `up` is a new cluster (as `kind create cluster`): no API objects survive a `down`.
    for old_dir in ("apiserver", "nodes", "logs"):
        shutil.rmtree(d / old_dir, ignore_errors=True)
    (d / "logs").mkdir(parents=True, exist_ok=True)
    (d / "progress.log").write_text("")
    st = State(
        name=args.name,
        prefix=f"{args.name}-",
        data_dir=str(d),
        nodes=args.nodes,
        proxy_mode=args.proxy_mode,
        lb_pool=args.lb_pool,
    )
    st.save()
    cmd = self_command() + [
        "_supervise",
        "--data-dir",
        str(d),
        "--api-port",
        str(args.api_port),
        "--backoff-base",
        str(args.backoff_base),
    ]
    if args.image_catalog:
        cmd += ["--image-catalog", str(Path(args.image_catalog).resolve())]
    if not args.dns:
        cmd += ["--no-dns"]
    if not args.localhost_lb:
        cmd += ["--no-localhost-lb"]
    out = (d / "logs" / "supervisor.log").open("ab")
    env = dict(os.environ, **{MARKER: st.prefix})
    p = subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
        cwd=str(d),
    )
    # No save here: the supervisor owns state.json from now on (it records its own pid first).
    st.supervisor_pid = p.pid
    print(
        f"kproxy-cluster: starting {args.name} ({args.nodes} nodes, --proxy-mode {args.proxy_mode}); "
        f"logs in {d}/logs",
        flush=True,
    )
    seen = 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        lines = (d / "progress.log").read_text().splitlines()
        for line in lines[seen:]:
            print(f"  {line}", flush=True)
            if line.startswith("READY"):
                kc = st.kubeconfig
                print(
                    f"\nThe cluster is up. Use it with:\n  export KUBECONFIG={kc}\n  kubectl get nodes -o wide\n"
                    f"  kproxy-cluster exec --name {args.name} -- curl -s http://LB_IP:PORT   "
                    f"(from the client netns on the node network)\n  kproxy-cluster down --name {args.name}"
                )
                return 0
            if line.startswith("FAILED") or line.startswith("STOPPED"):
                print(f"kproxy-cluster up failed; see {d}/logs/supervisor.log", file=sys.stderr)
                return 1
        seen = len(lines)
        if p.poll() is not None:
            print(
                f"kproxy-cluster: the supervisor exited with {p.returncode}; see {d}/logs/supervisor.log",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.2)
    print(f"kproxy-cluster up: not ready after {args.timeout} s; see {d}/logs", file=sys.stderr)
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    d = Path(args.data_dir)
    st = State.load(d)
    prefix = st.prefix if st else f"{args.name}-"
    if st and alive(st.supervisor_pid):
        os.kill(st.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + 40
        while alive(st.supervisor_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    # After a crash nothing above ran: find what is left by the marker and the name prefix.
    killed = 0
    for _ in range(3):
        pids = marked_pids(prefix) + [pid for pid in (st.pids.values() if st else []) if alive(pid)]
        if not pids:
            break
        for pid in set(pids):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    gone = netns.cleanup(prefix)
    if st:
        st.ready, st.supervisor_pid, st.pids, st.components = False, 0, {}, {}
        st.save()
    print(
        f"kproxy-cluster: {args.name} is down (removed {len(gone)} netns, killed {killed} leftover processes)"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _state(args)
    if st is None:
        print(f"no cluster {args.name} (no {args.data_dir}/state.json)")
        return 1
    up = alive(st.supervisor_pid)
    print(
        f"cluster {st.name}: {'up' if up and st.ready else 'starting' if up else 'down'}  data-dir {st.data_dir}"
    )
    print(f"kubeconfig: {st.kubeconfig}")
    for name, pid in sorted(st.pids.items()):
        print(f"  {name:<22} pid {pid:<8} {'running' if alive(pid) else 'exited'}")
    for name, what in sorted(st.components.items()):
        print(f"  {name:<22} {what}")
    if up and st.ready:

        async def nodes() -> list[dict[str, Any]]:
            async with api.Client(api.Config.from_kubeconfig(st.kubeconfig)) as c:
                items, _ = await c.list(api.path("nodes"))
                return items

        for n in asyncio.run(nodes()):
            ready = next(
                (
                    x["status"]
                    for x in (n.get("status") or {}).get("conditions") or []
                    if x["type"] == "Ready"
                ),
                "?",
            )
            addr = next(
                (
                    a["address"]
                    for a in (n.get("status") or {}).get("addresses") or []
                    if a["type"] == "InternalIP"
                ),
                "",
            )
            print(
                f"  node {n['metadata']['name']:<10} Ready={ready:<6} {addr:<14} podCIDR {n['spec'].get('podCIDR')}"
            )
    print(f"  netns: {' '.join(netns.owned(st.prefix))}")
    return 0 if up else 1


def cmd_exec(args: argparse.Namespace) -> int:
    st = _state(args)
    if st is None or not netns.exists(f"{st.prefix}client"):
        print(f"kproxy-cluster exec: cluster {args.name} is not up", file=sys.stderr)
        return 1
    cmd = [c for c in args.command if c != "--"] if args.command and args.command[0] == "--" else args.command
    if not cmd:
        print(
            "kproxy-cluster exec: give a command after --, e.g. exec -- curl http://IP:PORT", file=sys.stderr
        )
        return 2
    env = dict(os.environ, KUBECONFIG=st.kubeconfig)
    return subprocess.run(["ip", "netns", "exec", f"{st.prefix}client", *cmd], env=env).returncode


def cmd_logs(args: argparse.Namespace) -> int:
    """Container logs (kubectl logs needs a kubelet API the API server would proxy to; the node
    agents write one file per container instead, appended across restarts)."""
    st = _state(args)
    if st is None:
        print(f"kproxy-cluster logs: no cluster {args.name}", file=sys.stderr)
        return 1
    dirs = sorted(Path(st.data_dir).glob(f"nodes/*/logs/{args.namespace}_{args.pod}_*"))
    if not dirs:
        print(f"kproxy-cluster logs: no logs for pod {args.namespace}/{args.pod}", file=sys.stderr)
        return 1
    files = sorted(dirs[-1].glob(f"{args.container or '*'}.log"))
    if not files:
        print(f"kproxy-cluster logs: pod {args.pod} has no container {args.container!r}", file=sys.stderr)
        return 1
    for f in files:
        sys.stdout.write(f.read_text(errors="replace"))
    return 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    st = _state(args)
    if st is None:
        return 1
    print(st.kubeconfig)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    rc = cmd_up(args)
    if rc != 0:
        return rc
    st = _state(args)
    assert st is not None
    env = dict(os.environ, KUBECONFIG=st.kubeconfig)
    seed = Path(args.manifest)
    try:
        print(f"\n$ kubectl apply -f {seed}", flush=True)
        subprocess.run(["kubectl", "apply", "-f", str(seed)], env=env, check=True)
        print("$ kubectl rollout status deployment/flask-kubernetes", flush=True)
        subprocess.run(
            ["kubectl", "rollout", "status", "deployment/flask-kubernetes", "--timeout=180s"],
            env=env,
            check=True,
        )
        subprocess.run(["kubectl", "get", "pods", "-o", "wide"], env=env)
        lb_ip = ""
        for _ in range(100):
            r = subprocess.run(
                [
                    "kubectl",
                    "get",
                    "svc",
                    "flask-kubernetes-service",
                    "-o",
                    "jsonpath={.status.loadBalancer.ingress[0].ip}",
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            lb_ip = r.stdout.strip()
            if lb_ip:
                break
            time.sleep(0.2)
        st = _state(args) or st
        kp = st.components.get("kproxy", "")
        if lb_ip and kp.startswith("running"):
            print(f"\n$ kproxy-cluster exec -- curl -s http://{lb_ip}:6000", flush=True)
            ok = False
            for _ in range(30):  # kproxy programs the LB IP shortly after the endpoints are ready
                r = subprocess.run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        f"{st.prefix}client",
                        "curl",
                        "-s",
                        "-m",
                        "2",
                        f"http://{lb_ip}:6000",
                    ],
                    capture_output=True,
                    text=True,
                )
                if r.returncode == 0 and r.stdout:
                    print(r.stdout, end="", flush=True)
                    ok = True
                    break
                time.sleep(1)
            if not ok:
                print(f"(no answer through the LoadBalancer IP {lb_ip}:6000 yet; kproxy: {kp})")
        else:
            ips = subprocess.run(
                [
                    "kubectl",
                    "get",
                    "pods",
                    "-l",
                    "app=flask-kubernetes",
                    "-o",
                    "jsonpath={.items[0].status.podIP}",
                ],
                env=env,
                capture_output=True,
                text=True,
            ).stdout
            print(f"\n{kp or 'kproxy: not available yet'}; so this curls a pod IP directly, not the Service:")
            print(f"$ kproxy-cluster exec -- curl -s http://{ips}:5000", flush=True)
            subprocess.run(
                ["ip", "netns", "exec", f"{st.prefix}client", "curl", "-s", "-m", "5", f"http://{ips}:5000"]
            )
        print(
            f"\nThe cluster stays up until Ctrl-C. Meanwhile, in another shell:\n  export KUBECONFIG={st.kubeconfig}\n"
            f"  kubectl get pods,svc,endpointslices -o wide\n  curl http://localhost:6000  (relayed to the LB IP)",
            flush=True,
        )
        if args.no_wait:
            return 0

        def stop(*_: object) -> None:
            raise KeyboardInterrupt

        # Explicit handlers: a shell's background job inherits SIGINT ignored, and `kill` sends TERM.
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            signal.pause()
        except KeyboardInterrupt:
            print("\nstopping the cluster", flush=True)
        return 0
    finally:
        cmd_down(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kproxy-cluster", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--name", default="kpc", help="cluster name; prefixes every netns (default kpc)")
        sp.add_argument(
            "--data-dir", default="", help="state, logs, kubeconfig (default ~/.kproxy-cluster/NAME)"
        )

    def up_flags(sp: argparse.ArgumentParser) -> None:
        common(sp)
        sp.add_argument("--nodes", type=int, default=3)
        sp.add_argument(
            "--proxy-mode",
            default="iptables",
            help="kproxy mode on every node (iptables, ipvs, userspace, nftables) or none",
        )
        sp.add_argument("--lb-pool", default="10.251.0.0/24", help="LoadBalancer IPs (CIDR or a-b ranges)")
        sp.add_argument("--api-port", type=int, default=0, help="API server port (default: a free one)")
        sp.add_argument(
            "--image-catalog",
            default="",
            help="image -> command catalog (default examples/flask-kubernetes/images.yaml)",
        )
        sp.add_argument("--backoff-base", type=float, default=10.0, help="crash-loop backoff base seconds")
        sp.add_argument("--no-dns", dest="dns", action="store_false", help="do not start kproxy-dns")
        sp.add_argument(
            "--no-localhost-lb",
            dest="localhost_lb",
            action="store_false",
            help="do not relay LoadBalancer ports to localhost",
        )
        sp.add_argument("--timeout", type=float, default=180.0)

    up_flags(sub.add_parser("up", help="start the cluster"))
    demo = sub.add_parser("demo", help="up, apply the seed app, curl it, stay up until Ctrl-C, then down")
    up_flags(demo)
    demo.add_argument("--manifest", default=str(SEED))
    demo.add_argument("--no-wait", action="store_true", help="go down right after the curl")
    common(sub.add_parser("down", help="remove every netns and process of the cluster (idempotent)"))
    common(sub.add_parser("status", help="nodes and components"))
    common(sub.add_parser("kubeconfig", help="print the kubeconfig path"))
    lg = sub.add_parser("logs", help="a pod's container logs (from the node agent's log files)")
    common(lg)
    lg.add_argument("pod")
    lg.add_argument("-n", "--namespace", default="default")
    lg.add_argument("-c", "--container", default="")
    ex = sub.add_parser("exec", help="run a command in the client netns on the node network")
    common(ex)
    ex.add_argument("command", nargs=argparse.REMAINDER)

    sv = sub.add_parser("_supervise")
    sv.add_argument("--data-dir", required=True)
    sv.add_argument("--api-port", type=int, default=0)
    sv.add_argument("--image-catalog", default="")
    sv.add_argument("--backoff-base", type=float, default=10.0)
    sv.add_argument("--no-dns", dest="dns", action="store_false")
    sv.add_argument("--no-localhost-lb", dest="localhost_lb", action="store_false")
    ct = sub.add_parser("_controllers")
    ct.add_argument("--kubeconfig", required=True)
    ct.add_argument("--lb-pool", default="10.251.0.0/24")
    ct.add_argument("--max-endpoints-per-slice", type=int, default=100)
    ag = sub.add_parser("_agent")
    ag.add_argument("--kubeconfig", required=True)
    ag.add_argument("--prefix", required=True)
    ag.add_argument("--node-index", type=int, required=True)
    ag.add_argument("--data-dir", required=True)
    ag.add_argument("--image-catalog", default="")
    ag.add_argument("--zone", default="")
    ag.add_argument("--dns-ip", default="")
    ag.add_argument("--backoff-base", type=float, default=10.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "name") and not getattr(args, "data_dir", ""):
        args.data_dir = str(default_data_dir(args.name))
    handlers = {
        "up": cmd_up,
        "down": cmd_down,
        "status": cmd_status,
        "exec": cmd_exec,
        "demo": cmd_demo,
        "kubeconfig": cmd_kubeconfig,
        "logs": cmd_logs,
        "_supervise": cmd_supervise,
        "_controllers": cmd_controllers,
        "_agent": cmd_agent,
    }
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
