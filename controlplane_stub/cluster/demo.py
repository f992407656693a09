"""`kproxy-cluster demo`: up, the seed app, a curl through its LoadBalancer IP, then down."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from pathlib import Path

from controlplane_stub.cluster.cli import _state, cmd_down, cmd_up


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
        want = 2 if st.ip_family == "dual" else 1  # LoadBalancer IPs: one per family of the Service
        if want == 2:
            # A Service is single-stack unless it asks: the seed Service asks for both families.
            patch = '{"spec":{"ipFamilyPolicy":"PreferDualStack"}}'
            print(f"$ kubectl patch svc flask-kubernetes-service -p '{patch}'", flush=True)
            subprocess.run(["kubectl", "patch", "svc", "flask-kubernetes-service", "-p", patch], env=env, check=True)
        print("$ kubectl rollout status deployment/flask-kubernetes", flush=True)
        subprocess.run(
            ["kubectl", "rollout", "status", "deployment/flask-kubernetes", "--timeout=180s"],
            env=env,
            check=True,
        )
        subprocess.run(["kubectl", "get", "pods", "-o", "wide"], env=env)
        lb_ips: list[str] = []
        for _ in range(100):
            r = subprocess.run(
                [
                    "kubectl",
                    "get",
                    "svc",
                    "flask-kubernetes-service",
                    "-o",
                    "jsonpath={.status.loadBalancer.ingress[*].ip}",
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            lb_ips = r.stdout.split()
            if len(lb_ips) >= want:
                break
            time.sleep(0.2)
        st = _state(args) or st
        kp = st.components.get("kproxy", "")
        if lb_ips and kp.startswith("running"):
            for lb_ip in lb_ips:
                target = f"http://[{lb_ip}]:6000" if ":" in lb_ip else f"http://{lb_ip}:6000"
                print(f"\n$ kproxy-cluster exec -- curl -s -g {target}", flush=True)
                ok = False
                for _ in range(30):  # kproxy programs the LB IP shortly after the endpoints are ready
                    r = subprocess.run(
                        ["ip", "netns", "exec", f"{st.prefix}client", "curl", "-s", "-g", "-m", "2", target],
                        capture_output=True,
                        text=True,
                    )
                    if r.returncode == 0 and r.stdout:
                        print(r.stdout, end="", flush=True)
                        ok = True
                        break
                    time.sleep(1)
                if not ok:
                    print(f"(no answer through the LoadBalancer IP {target} yet; kproxy: {kp})")
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
