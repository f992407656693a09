"""The user commands of kproxy-cluster (up, down, status, exec, logs, kubeconfig) and its parser."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.agent import netns
from controlplane_stub.cluster.components import cmd_agent, cmd_controllers
from controlplane_stub.cluster.state import (
    MARKER,
    SEED,
    State,
    alive,
    default_data_dir,
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
