"""The user commands of kproxy-cluster (up, down, status, exec, logs, kubeconfig) and its parser."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.agent import netns
from controlplane_stub.agent.netns import IP_FAMILIES
from controlplane_stub.agent.record import Record
from controlplane_stub.cluster.components import cmd_agent, cmd_controllers
from controlplane_stub.cluster.state import (
    MARKER,
    MAX_ZONES,
    SEED,
    State,
    default_data_dir,
    default_lb_pool,
    lb_routes,
    marked_pids,
    self_command,
)
from controlplane_stub.cluster.supervisor import cmd_supervise


def _state(args: argparse.Namespace) -> State | None:
    return State.load(Path(args.data_dir))


def cmd_up(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("kproxy-cluster up: needs root (network namespaces); rerun with sudo", file=sys.stderr)
        return 1
    d = Path(args.data_dir)
    old = State.load(d)
    if old and supervisor_running(old):
        print(
            f"cluster {old.name} is already up (supervisor pid {old.supervisor_pid}); "
            f"`kproxy-cluster down --name {old.name}` first",
            file=sys.stderr,
        )
        return 1
    if args.nodes < 1 or args.nodes > 200:
        print("--nodes: between 1 and 200", file=sys.stderr)
        return 2
    if not 0 <= args.zones <= MAX_ZONES:
        print(f"--zones: between 0 and {MAX_ZONES}", file=sys.stderr)
        return 2
    if not 1 <= args.apiservers <= 9 or (args.apiservers > 1 and args.store != "etcd"):
        print("--apiservers: between 1 and 9, more than 1 only with --store etcd", file=sys.stderr)
        return 2
    if not (0 < args.backoff_base <= args.backoff_cap and args.backoff_reset > 0):
        print(
            "--backoff-base, --backoff-cap, --backoff-reset: need 0 < base <= cap and reset > 0",
            file=sys.stderr,
        )
        return 2
    try:
        lb_routes(args.lb_pool or default_lb_pool(args.ip_family))
    except ValueError as e:
        print(f"--lb-pool: {e}", file=sys.stderr)
        return 2
    os.umask(0o077)
    # What an earlier cluster of this data dir left after a crash goes first (only what it made).
    if old is not None or (d / "owned.jsonl").exists():
        remove_made(d, old)
    # Every `up` is a new cluster (as `kind create cluster`): no API objects survive a `down`.
    for old_dir in ("apiserver", "nodes", "logs", "etcd", *(f"apiserver-{i}" for i in range(10))):
        shutil.rmtree(d / old_dir, ignore_errors=True)
    # The cluster's directory holds its tokens and keys: the owner's only, as its parent.
    d.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.mkdir(mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    (d / "logs").mkdir(mode=0o700, exist_ok=True)
    (d / "progress.log").write_text("")
    st = State(
        name=args.name,
        prefix=f"{args.name}-",
        data_dir=str(d),
        nodes=args.nodes,
        proxy_mode=args.proxy_mode,
        lb_pool=args.lb_pool or default_lb_pool(args.ip_family),
        instance=secrets.token_hex(6),
        ip_family=args.ip_family,
    )
    st.save()
    cmd = self_command() + [
        "_supervise",
        "--data-dir",
        str(d),
        "--api-port",
        str(args.api_port),
        "--store",
        args.store,
        "--apiservers",
        str(args.apiservers),
        "--zones",
        str(args.zones),
        "--backoff-base",
        str(args.backoff_base),
        "--backoff-cap",
        str(args.backoff_cap),
        "--backoff-reset",
        str(args.backoff_reset),
    ]
    if args.image_catalog:
        cmd += ["--image-catalog", str(Path(args.image_catalog).resolve())]
    if not args.dns:
        cmd += ["--no-dns"]
    if not args.localhost_lb:
        cmd += ["--no-localhost-lb"]
    out = (d / "logs" / "supervisor.log").open("ab")
    env = dict(os.environ, **{MARKER: st.marker})
    p = subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
        cwd=str(d),
    )
    st.record.process("supervisor", p.pid)
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


def supervisor_running(st: State) -> bool:
    """The recorded supervisor process (same pid and start time) still runs."""
    live = st.record.load().live_pids()
    return live.get(st.supervisor_pid) == "supervisor"


def remove_made(d: Path, st: State | None) -> tuple[list[str], int]:
    """Kills the processes and removes the namespaces that the record of data dir d lists (and
    processes that carry this `up`'s marker), nothing else; then forgets the record."""
    rec = Record(d / "owned.jsonl")
    owned = rec.load()
    killed = 0
    for _ in range(3):
        pids = set(owned.live_pids()) | set(marked_pids(st.marker) if st and st.instance else [])
        pids.discard(os.getpid())
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    gone = netns.remove_owned(owned)
    rec.forget()
    return gone, killed


def cmd_down(args: argparse.Namespace) -> int:
    d = Path(args.data_dir)
    st = State.load(d)
    if st and supervisor_running(st):
        os.kill(st.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + 40
        while supervisor_running(st) and time.monotonic() < deadline:
            time.sleep(0.2)
    # After a crash the supervisor's own shutdown did not run: the record says what is left.
    gone, killed = remove_made(d, st)
    if st:
        st.ready, st.supervisor_pid, st.pids, st.components, st.supervised = False, 0, {}, {}, {}
        st.save()
    print(
        f"kproxy-cluster: {args.name} is down (removed {len(gone)} netns, killed {killed} leftover processes)"
    )
    return 0


def _ago(t: object) -> str:
    if not isinstance(t, (int, float)) or t <= 0:
        return "?"
    stamp = time.strftime("%H:%M:%S", time.localtime(t))
    return f"{stamp} ({max(0, time.time() - t):.0f} s ago)"


def component_lines(st: State, sup_alive: bool) -> tuple[list[str], list[str]]:
    """One line per supervised process, checked against /proc (not only what state.json says), and
    the names of those not running."""
    live = st.record.load().live_pids()
    lines, down = [], []
    for name, v in sorted(st.supervised.items()):
        if not isinstance(v, dict):
            continue
        raw_pid = v.get("pid")
        pid = raw_pid if isinstance(raw_pid, int) else 0
        restarts, state, rc = v.get("restarts", 0), v.get("state"), v.get("last_exit")
        running = state == "running" and live.get(pid) == name
        if running:
            what = f"running   pid {pid:<8} since {_ago(v.get('since'))}"
            what += "" if sup_alive else " (not supervised: nothing restarts it)"
        elif state == "backoff" and sup_alive:
            nxt = v.get("next_start")
            wait = (
                f", next start in {max(0.0, nxt - time.time()):.0f} s"
                if isinstance(nxt, (int, float))
                else ""
            )
            what = f"DOWN      since {_ago(v.get('since'))}, exit code {rc}, crash-loop back-off{wait}"
        elif state == "running" and sup_alive:
            what = f"DOWN      pid {pid} exited (the supervisor restarts it)"
        else:
            what = f"DOWN      not supervised (last pid {pid}, {state})"
        if not running:
            down.append(name)
        lines.append(f"  {name:<22} {what}, restarts {restarts}")
    return lines, down


def _nodes(st: State) -> list[str]:
    async def get() -> list[dict[str, Any]]:
        async with api.Client(api.load_kubeconfig(st.kubeconfig)) as c:
            items, _ = await c.list(api.path("nodes"))
            return items

    try:
        items = asyncio.run(asyncio.wait_for(get(), 5))
    except Exception as e:  # noqa: BLE001 - status reports whatever went wrong in one line
        return [f"  nodes: the API server did not answer ({type(e).__name__}: {e})"]
    out = []
    for n in items:
        if not isinstance(n, dict):
            continue
        status, md = n.get("status") or {}, n.get("metadata") or {}
        conds = [x for x in status.get("conditions") or [] if isinstance(x, dict)]
        addrs = [x for x in status.get("addresses") or [] if isinstance(x, dict)]
        ready = next((str(x.get("status")) for x in conds if x.get("type") == "Ready"), "?")
        addr = next((str(x.get("address")) for x in addrs if x.get("type") == "InternalIP"), "")
        pod_cidr = (n.get("spec") or {}).get("podCIDR")
        out.append(f"  node {md.get('name')!s:<10} Ready={ready:<6} {addr:<14} podCIDR {pod_cidr}")
    return out


def cmd_status(args: argparse.Namespace) -> int:
    """What runs, checked against /proc; exit code 0 only when every component runs."""
    st = _state(args)
    if st is None:
        print(f"no cluster {args.name} (no {args.data_dir}/state.json)")
        return 1
    sup = supervisor_running(st)
    lines, down = component_lines(st, sup)
    if not sup:
        word = "down (its supervisor is not running)" if st.supervised else "down"
    elif not st.ready:
        word = "starting"
    elif down:
        word = f"degraded: {', '.join(down)} not running"
    else:
        word = "up"
    print(f"cluster {st.name}: {word}  data-dir {st.data_dir}")
    print(f"kubeconfig: {st.kubeconfig}  ip-family: {st.ip_family}  LoadBalancer pool: {st.lb_pool}")
    for line in lines:
        print(line)
    for name, what in sorted(st.components.items()):
        print(f"  {name:<22} {what}")
    if sup and st.ready and "apiserver" not in down:
        for line in _nodes(st):
            print(line)
    owned = st.record.load()
    print(f"  netns: {' '.join(n for n in sorted(owned.netns) if owned.owns_netns(n) and netns.exists(n))}")
    if not sup and (owned.netns or owned.live_pids()):
        print(f"  what it made is still recorded: `kproxy-cluster down --name {st.name}` removes it")
    return 0 if word == "up" else 1


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
    """Container logs straight from the node agents' files (the current instance, timestamped);
    without the API server, unlike `kubectl logs`."""
    st = _state(args)
    if st is None:
        print(f"kproxy-cluster logs: no cluster {args.name}", file=sys.stderr)
        return 1
    dirs = sorted(Path(st.data_dir).glob(f"nodes/*/logs/{args.namespace}_{args.pod}_*"))
    if not dirs:
        print(f"kproxy-cluster logs: no logs for pod {args.namespace}/{args.pod}", file=sys.stderr)
        return 1
    files = [f for f in sorted(dirs[-1].glob(f"{args.container or '*'}.log")) if not f.name.endswith(".previous.log")]
    if not files:
        print(f"kproxy-cluster logs: pod {args.pod} has no container {args.container!r}", file=sys.stderr)
        return 1
    from controlplane_stub.agent.logs import ContainerLog, log_text

    for f in files:
        sys.stdout.write(log_text(ContainerLog(f.parent, f.name.removesuffix(".log"))).decode(errors="replace"))
    return 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    st = _state(args)
    if st is None:
        return 1
    print(st.kubeconfig)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kproxy-cluster",
        description="A Kubernetes cluster on one machine, made of network namespaces and processes.",
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
            "--zones",
            type=int,
            default=3,
            help="spread the nodes over this many zones, round robin (label topology.kubernetes.io/zone "
            "zone-a, zone-b, ...; 0: no zone label; default 3)",
        )
        sp.add_argument(
            "--proxy-mode",
            default="iptables",
            help="kproxy mode on every node (iptables, ipvs, userspace, nftables) or none",
        )
        sp.add_argument(
            "--ip-family",
            choices=IP_FAMILIES,
            default="ipv4",
            help="addresses of nodes, pods and Services: ipv4 (default), ipv6, or dual (both, IPv4 primary)",
        )
        sp.add_argument(
            "--lb-pool",
            default="",
            help="LoadBalancer IPs (CIDRs or a-b ranges, comma separated; default 10.251.0.0/24 and/or "
            "fd00:10:251::/120 by --ip-family)",
        )
        sp.add_argument("--api-port", type=int, default=0, help="API server port (default: a free one)")
        sp.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite",
                        help="etcd: 3 etcd members on loopback and --apiservers API servers behind one address")
        sp.add_argument("--apiservers", type=int, default=1, help="API servers with --store etcd (default 1)")
        sp.add_argument(
            "--image-catalog",
            default="",
            help="image -> command catalog (default: the one in the package, examples/flask-kubernetes/images.yaml)",
        )
        sp.add_argument(
            "--backoff-base",
            type=float,
            default=10.0,
            help="crash-loop back-off of components and containers: first delay (s), doubling",
        )
        sp.add_argument("--backoff-cap", type=float, default=300.0, help="... up to this (s)")
        sp.add_argument(
            "--backoff-reset", type=float, default=600.0, help="... and reset after a run this long (s)"
        )
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
    sv.add_argument("--store", default="sqlite")
    sv.add_argument("--apiservers", type=int, default=1)
    sv.add_argument("--zones", type=int, default=3)
    sv.add_argument("--image-catalog", default="")
    sv.add_argument("--backoff-base", type=float, default=10.0)
    sv.add_argument("--backoff-cap", type=float, default=300.0)
    sv.add_argument("--backoff-reset", type=float, default=600.0)
    sv.add_argument("--no-dns", dest="dns", action="store_false")
    sv.add_argument("--no-localhost-lb", dest="localhost_lb", action="store_false")
    ct = sub.add_parser("_controllers")
    ct.add_argument("--kubeconfig", required=True)
    ct.add_argument("--lb-pool", default="10.251.0.0/24")
    ct.add_argument("--max-endpoints-per-slice", type=int, default=100)
    ag = sub.add_parser("_agent")
    ag.add_argument("--kubeconfig", required=True)
    ag.add_argument("--prefix", required=True)
    ag.add_argument("--ip-family", choices=IP_FAMILIES, default="ipv4")
    ag.add_argument("--node-index", type=int, required=True)
    ag.add_argument("--data-dir", required=True)
    ag.add_argument("--image-catalog", default="")
    ag.add_argument("--zone", default="")
    ag.add_argument("--dns-ip", default="")
    ag.add_argument("--backoff-base", type=float, default=10.0)
    ag.add_argument("--backoff-cap", type=float, default=300.0)
    ag.add_argument("--backoff-reset", type=float, default=600.0)
    ag.add_argument("--hide-path", action="append", default=[], help="a directory containers must not see")
    ag.add_argument("--record", default="", help="record the pod namespaces made here in this file")
    ag.add_argument("--kubelet-token-file", default="", help="the token the API server shows to the logs/exec endpoint")
    return p


def _demo(args: argparse.Namespace) -> int:
    from controlplane_stub.cluster.demo import cmd_demo  # demo builds on up/down: imported late

    return cmd_demo(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "name") and not getattr(args, "data_dir", ""):
        args.data_dir = str(default_data_dir(args.name))
    handlers = {
        "up": cmd_up,
        "down": cmd_down,
        "status": cmd_status,
        "exec": cmd_exec,
        "demo": _demo,
        "kubeconfig": cmd_kubeconfig,
        "logs": cmd_logs,
        "_supervise": cmd_supervise,
        "_controllers": cmd_controllers,
        "_agent": cmd_agent,
    }
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
