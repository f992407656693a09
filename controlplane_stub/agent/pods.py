"""A pod on the one-machine cluster: a network namespace plus one real process per container.

PodWorker owns one pod: it builds the netns, runs init containers then containers, runs their
probes, restarts them per restartPolicy with the kubelet's crash-loop backoff, and reports the pod
status (phase, conditions, containerStatuses, podIP) with merge patches to pods/NAME/status whenever
it changes. Graceful termination sends SIGTERM, then SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane_stub.agent import netns, probes
from controlplane_stub.agent.backoff import CrashLoopBackoff
from controlplane_stub.agent.catalog import ImageError
from controlplane_stub.agent.logs import MAX_LINE, ContainerLog
from controlplane_stub.agent.security import Identity, SecurityContextError, exposures, identity

if TYPE_CHECKING:
    from controlplane_stub.agent.node import NodeAgent

log = logging.getLogger("kpc.agent")
UNSHARE = shutil.which("unshare")
PODINIT = str(Path(__file__).resolve().parent / "podinit.py")
Obj = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_netns_name(prefix: str, uid: str) -> str:
    return f"{prefix}p{hashlib.sha1(uid.encode()).hexdigest()[:10]}"


def veth_name(uid: str) -> str:
    return f"v{hashlib.sha1(uid.encode()).hexdigest()[:10]}"


@dataclass
class ProbeState:
    successes: int = 0
    failures: int = 0


@dataclass
class ContainerRunner:
    """One container: its process, restart count, state and readiness."""

    worker: PodWorker
    spec: Obj
    init: bool = False
    proc: asyncio.subprocess.Process | None = None
    restart_count: int = 0
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    ready: bool = False
    started_once: bool = False
    done: bool = False
    exit_code: int | None = None
    stopping: bool = False
    liveness_kill: bool = False
    started: bool = False
    who: Identity | None = None
    log: ContainerLog | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> Obj:
        st: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": f"kpc-catalog://{self.spec.get('image', '')}",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": "running" in self.state and self.started,
            "state": self.state,
        }
        if self.proc is not None:
            st["containerID"] = f"kpc://{self.proc.pid}"
        if self.last_state:
            st["lastState"] = self.last_state
        return st

    async def run(self) -> None:
        """Runs the container until it must not restart any more (policy, success or stop)."""
        w = self.worker
        policy = "OnFailure" if self.init else w.pod["spec"].get("restartPolicy", "Always")
        cfg = w.agent.config
        backoff_base = cfg.backoff_base
        backoff = CrashLoopBackoff(backoff_base, max(cfg.backoff_cap, backoff_base), cfg.backoff_reset)
        while not self.stopping:
            try:
                argv, image_env, cwd = w.agent.catalog.resolve(self.spec)
                self.who = identity(w.pod["spec"], self.spec)
            except (ImageError, SecurityContextError) as e:
                reason = e.reason if isinstance(e, ImageError) else "CreateContainerConfigError"
                if self.state.get("waiting", {}).get("reason") != reason:
                    w.event("Warning", reason if isinstance(e, ImageError) else "Failed", f"Error: {e}")
                self.state = {"waiting": {"reason": reason, "message": str(e)}}
                w.changed()
                await w.sleep_unless_stopping(max(backoff_base, 1.0) * 2)
                continue
            env = w.container_env(self.spec, image_env, self.who)
            wrapper = w.wrapper(self.who, w.agent.catalog.program_paths(self.spec), cwd)
            self.log = self.log or ContainerLog(w.log_dir, self.name)
            self.log.new_instance()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    "ip",
                    "netns",
                    "exec",
                    w.netns,
                    *wrapper,
                    *argv,
                    env=env,
                    cwd="/",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    stdin=asyncio.subprocess.DEVNULL,
                    start_new_session=True,
                    limit=MAX_LINE,
                )
            except OSError as e:
                self.state = {"waiting": {"reason": "RunContainerError", "message": str(e)}}
                w.changed()
                await w.sleep_unless_stopping(backoff_base)
                continue
            assert self.proc.stdout is not None and self.proc.stderr is not None
            pumps = [asyncio.create_task(self.log.pump(self.proc.stdout, "stdout")),
                     asyncio.create_task(self.log.pump(self.proc.stderr, "stderr"))]
            started = now()
            if self.restart_count == 0:
                w.event(
                    "Normal",
                    "Pulled",
                    f'Container image "{self.spec.get("image", "")}" already present on machine',
                )
                w.event("Normal", "Created", f"Created container {self.name}")
            w.event("Normal", "Started", f"Started container {self.name}")
            t_start = time.monotonic()
            self.started_once = True
            self.state = {"running": {"startedAt": started}}
            # With a startupProbe, the container is not "started" (and its readiness and liveness
            # probes do not run) until that probe succeeds, as in the kubelet.
            self.started = "startupProbe" not in self.spec
            self.ready = not self.init and self.started and "readinessProbe" not in self.spec
            w.changed()
            probe_tasks = [] if self.init else [asyncio.create_task(self._probes())]
            rc = await self.proc.wait()
            # The pipes end when every holder of them (the container's children too) exited.
            await asyncio.wait(pumps, timeout=2.0)
            for t in probe_tasks:
                t.cancel()
            self.ready = False
            self.exit_code = rc
            reason = "Completed" if rc == 0 else "Error"
            if rc < 0:
                rc = 128 - rc  # killed by signal N: the runtime reports 128+N
            self.last_state = {
                "terminated": {
                    "exitCode": rc,
                    "reason": reason,
                    "startedAt": started,
                    "finishedAt": now(),
                    "containerID": f"kpc://{self.proc.pid}",
                }
            }
            if self.stopping or policy == "Never" or (policy == "OnFailure" and rc == 0):
                self.state, self.last_state = self.last_state, {}
                self.done = True
                w.changed()
                return
            # kubelet's crash-loop backoff; restartCount itself only ever grows, as the kubelet's.
            delay = backoff.after_exit(time.monotonic() - t_start)
            self.restart_count += 1
            if delay:
                w.event(
                    "Warning",
                    "BackOff",
                    f"Back-off restarting failed container {self.name} in pod "
                    f"{w.pod['metadata']['name']}_{w.pod['metadata']['namespace']}",
                )
            self.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff" if delay else "ContainerCreating",
                    "message": f"back-off {delay:.0f}s restarting failed container={self.name}",
                }
            }
            w.changed()
            self.liveness_kill = False
            await w.sleep_unless_stopping(delay)
        if not self.done:
            self.done = True
            w.changed()

    async def _probes(self) -> None:
        if not self.started:
            if not await self._probe_loop("startupProbe"):
                return
            self.started = True
            self.ready = "readinessProbe" not in self.spec
            self.worker.changed()
        await asyncio.gather(
            *(self._probe_loop(k) for k in ("readinessProbe", "livenessProbe") if k in self.spec)
        )

    async def _probe_loop(self, kind: str) -> bool:
        """Runs one probe forever (a startupProbe: until it succeeds, then True, or fails, then False)."""
        w = self.worker
        probe = self.spec[kind]
        period = float(probe.get("periodSeconds", 10))
        success_needed = int(probe.get("successThreshold", 1))
        failure_needed = int(probe.get("failureThreshold", 3))
        st = ProbeState()
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        while True:
            # An exec probe runs as the container does: its user, its view of the files.
            wrapper = w.wrapper(self.who, [], "") if self.who is not None else []
            ok, msg = await probes.run_probe(
                probe, self.spec, w.agent.node.netns, w.netns, w.pod_ip, exec_wrapper=wrapper
            )
            if ok:
                st.successes, st.failures = st.successes + 1, 0
            else:
                st.failures, st.successes = st.failures + 1, 0
            if kind == "startupProbe":
                if ok and st.successes >= success_needed:
                    return True
                if not ok and st.failures >= failure_needed:
                    w.event("Warning", "Unhealthy", f"Startup probe failed: {msg}")
                    w.event(
                        "Normal", "Killing", f"Container {self.name} failed startup probe, will be restarted"
                    )
                    await self.kill(float(w.pod["spec"].get("terminationGracePeriodSeconds", 30)))
                    return False
            elif kind == "readinessProbe":
                if ok and st.successes >= success_needed and not self.ready:
                    self.ready = True
                    w.changed()
                elif not ok and st.failures >= failure_needed and self.ready:
                    self.ready = False
                    w.event("Warning", "Unhealthy", f"Readiness probe failed: {msg}")
                    w.changed()
            elif not ok and st.failures >= failure_needed:
                log.info("pod=%s container=%s liveness probe failed: %s; restarting", w.key, self.name, msg)
                w.event("Warning", "Unhealthy", f"Liveness probe failed: {msg}")
                w.event(
                    "Normal", "Killing", f"Container {self.name} failed liveness probe, will be restarted"
                )
                self.liveness_kill = True
                await self.kill(float(w.pod["spec"].get("terminationGracePeriodSeconds", 30)))
                return False
            await asyncio.sleep(period)

    async def kill(self, grace: float) -> None:
        """SIGTERM the container's process group, SIGKILL after grace seconds."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                await asyncio.wait_for(proc.wait(), wait)
                return
            except TimeoutError:
                continue


class PodWorker:
    def __init__(self, agent: NodeAgent, pod: Obj) -> None:
        self.agent = agent
        self.pod = pod
        md = pod["metadata"]
        self.key = f"{md['namespace']}/{md['name']}"
        self.uid = str(md["uid"])
        self.netns = pod_netns_name(agent.config.prefix, self.uid)
        self.veth = veth_name(self.uid)
        self.pod_ip = ""  # the primary family's; pod_ips: one per family of the node's podCIDRs
        self.pod_ips: tuple[str, ...] = ()
        self.log_dir = agent.config.data_dir / "logs" / f"{md['namespace']}_{md['name']}_{self.uid[:8]}"
        spec = pod["spec"]
        self.init_containers = [ContainerRunner(self, c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [ContainerRunner(self, c) for c in spec.get("containers") or []]
        self.initialized = not self.init_containers
        self.start_time = now()
        self.transitions: dict[str, tuple[str, str]] = {}
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self.finished = asyncio.Event()
        self.last_sent: Obj | None = None
        self.terminating = False
        self.task: asyncio.Task[None] | None = None

    # -- helpers used by containers --------------------------------------------------------
    def event(self, type_: str, reason: str, message: str) -> None:
        self.agent.events.event(
            {"apiVersion": "v1", "kind": "Pod", "metadata": self.pod["metadata"]}, type_, reason, message
        )

    def wrapper(self, who: Identity, trusted: list[str], workdir: str) -> list[str]:
        """What runs before a container's argv (inside `ip netns exec POD`): its own UTS and mount
        namespaces, then podinit (hostname, hidden cluster state, identity; see podinit.py).
        `unshare` and podinit exec, so the container keeps the pid the agent started."""
        if UNSHARE is None:
            raise OSError("unshare (util-linux) is not installed")
        name = str(self.pod["spec"].get("hostname") or self.pod["metadata"]["name"])[:63]
        cmd = [UNSHARE, "--uts", "--mount", "--propagation", "private", "--"]
        cmd += [sys.executable, "-I", "-S", PODINIT, "--hostname", name]
        cmd += ["--uid", str(who.uid), "--gid", str(who.gid), "--groups", ",".join(map(str, who.groups))]
        cmd += ["--no-new-privs"] if who.no_new_privs else []
        for d in self.agent.config.hide_paths:
            cmd += ["--hide", d]
        for parent, child in exposures(trusted, who):
            cmd += ["--expose", parent, child]
        if workdir:
            cmd += ["--workdir", workdir]
        return cmd + ["--"]

    def changed(self) -> None:
        self._changed.set()

    async def sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    def container_env(self, c: Obj, image_env: dict[str, str], who: Identity) -> dict[str, str]:
        """The container's whole environment: made here from the pod spec and the image, never
        inherited from the agent (whose environment is the cluster's)."""
        md, spec = self.pod["metadata"], self.pod["spec"]
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root" if who.uid == 0 else "/",
            "HOSTNAME": str(md["name"]),
            "LANG": "C.UTF-8",
        }
        env.update(image_env)
        fields = {
            "metadata.name": md["name"],
            "metadata.namespace": md["namespace"],
            "metadata.uid": self.uid,
            "spec.nodeName": spec.get("nodeName", ""),
            "status.podIP": self.pod_ip,
            "status.podIPs": ",".join(self.pod_ips or (self.pod_ip,)),  # both families, as the kubelet
            "status.hostIP": self.agent.node.ip,
            "status.hostIPs": ",".join(self.agent.node.all_ips),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        }
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = str(e["value"])
            elif (e.get("valueFrom") or {}).get("fieldRef"):
                env[e["name"]] = str(fields.get(e["valueFrom"]["fieldRef"].get("fieldPath", ""), ""))
        return env

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"pod {self.key}")

    async def run(self) -> None:
        writer = asyncio.create_task(self._status_writer())
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            st = self.pod.get("status") or {}
            earlier = [p.get("ip") for p in st.get("podIPs") or [] if isinstance(p, dict)] or [st.get("podIP")]
            self.pod_ips = self.agent.ipam.allocate_all(self.uid, [x for x in earlier if isinstance(x, str)])
            self.pod_ip = self.pod_ips[0]
            rec = self.agent.record
            if netns.exists(self.netns) and (rec is None or rec.load().owns_netns(self.netns)):
                # Left by an earlier run of this agent (its processes were its children): start clean.
                # One not in the record is not ours: setup_pod refuses it.
                await asyncio.to_thread(netns.delete, self.netns)
            await asyncio.to_thread(
                netns.setup_pod,
                self.agent.node,
                self.netns,
                self.veth,
                self.pod_ips,
                self.agent.record,
                self.agent.resolv_conf(self.pod),
            )
            self.changed()
            for ic in self.init_containers:
                await ic.run()
                if ic.exit_code != 0 or self._stop.is_set():
                    break
            else:
                self.initialized = True
                self.changed()
                await asyncio.gather(*(c.run() for c in self.containers))
        except Exception as e:
            log.warning("pod=%s failed to start: %r", self.key, e)
            for c in self.containers:
                c.state = {"waiting": {"reason": "CreateContainerError", "message": str(e)}}
            self.changed()
            await self._stop.wait()
        finally:
            self.changed()
            await asyncio.sleep(0)
            self._stop.set()
            self.changed()
            try:
                await asyncio.wait_for(writer, 10)
            except (TimeoutError, Exception) as e:  # status is best effort at the end
                log.debug("pod=%s final status: %r", self.key, e)
            await asyncio.to_thread(netns.delete, self.netns)
            self.agent.ipam.release(self.uid)
            self.finished.set()

    async def terminate(self, grace: float) -> None:
        """Graceful stop: SIGTERM every container, SIGKILL after grace, then the netns goes."""
        if self.terminating:
            await self.finished.wait()
            return
        self.terminating = True
        for c in self.init_containers + self.containers:
            c.stopping = True
            if c.proc is not None and c.proc.returncode is None:
                self.event("Normal", "Killing", f"Stopping container {c.name}")
        self._stop.set()
        await asyncio.gather(*(c.kill(grace) for c in self.init_containers + self.containers))
        for c in self.containers:
            if not c.started_once:
                c.done = True
        self.changed()
        await self.finished.wait()

    # -- status -----------------------------------------------------------------------------
    def _cond(self, typ: str, ok: bool, reason: str = "") -> Obj:
        status = "True" if ok else "False"
        prev = self.transitions.get(typ)
        if prev is None or prev[0] != status:
            self.transitions[typ] = (status, now())
        c: Obj = {
            "type": typ,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": self.transitions[typ][1],
        }
        if reason and not ok:
            c["reason"] = reason
        return c

    def phase(self) -> str:
        if not self.initialized:
            if (
                any(ic.done and ic.exit_code not in (0, None) for ic in self.init_containers)
                and self.pod["spec"].get("restartPolicy") == "Never"
            ):
                return "Failed"
            return "Pending"
        cs = self.containers
        if cs and all(c.done for c in cs):
            return "Succeeded" if all(c.exit_code == 0 for c in cs) else "Failed"
        if any("running" in c.state or c.restart_count > 0 for c in cs):
            return "Running"
        return "Pending"

    def status(self) -> Obj:
        cs = self.containers
        containers_ready = bool(cs) and all(c.ready for c in cs)
        not_ready = [c.name for c in cs if not c.ready]
        reason = "ContainersNotReady" if not_ready else ""
        st: Obj = {
            "phase": self.phase(),
            "hostIP": self.agent.node.ip,
            "hostIPs": [{"ip": a} for a in self.agent.node.all_ips],
            "startTime": self.start_time,
            "qosClass": "BestEffort",
            "conditions": [
                self._cond("PodReadyToStartContainers", bool(self.pod_ip)),
                self._cond("Initialized", self.initialized, "ContainersNotInitialized"),
                self._cond("Ready", containers_ready, reason),
                self._cond("ContainersReady", containers_ready, reason),
                self._cond("PodScheduled", True),
            ],
            "containerStatuses": [c.status() for c in cs],
        }
        if self.init_containers:
            st["initContainerStatuses"] = [c.status() for c in self.init_containers]
        if self.pod_ip:
            st["podIP"] = self.pod_ip
            st["podIPs"] = [{"ip": a} for a in self.pod_ips or (self.pod_ip,)]
        return st

    async def _status_writer(self) -> None:
        """Sends the pod status when it changed; bursts of changes coalesce into one patch."""
        from controlplane_stub import client as api

        url = api.path("pods", self.pod["metadata"]["namespace"], self.pod["metadata"]["name"], "status")
        while True:
            await self._changed.wait()
            await asyncio.sleep(0.02)
            self._changed.clear()
            st = self.status()
            if st != self.last_sent:
                try:
                    await self.agent.client.patch(url, {"status": st})
                    self.last_sent = st
                except api.ApiError as e:
                    if e.code == 404:
                        return
                    log.warning("pod=%s status patch failed: %s", self.key, e)
                    self._changed.set()
                    await asyncio.sleep(0.5)
                    continue
            if (
                self._stop.is_set()
                and all(c.done or not c.started_once for c in self.containers + self.init_containers)
                and not self._changed.is_set()
            ):
                return
