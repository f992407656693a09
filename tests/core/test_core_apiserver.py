"""kproxy's client side against the real API server (controlplane_stub's kproxy-apiserver process,
HTTPS with its CA and a bearer token from its kubeconfig): the Reflector lists, watches, resumes
after the server is killed and restarted, relists on 410; `kproxy` itself runs as a process with a
recording Proxier and its healthz/metrics are read over HTTP on loopback.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers.kproxy_e2e import Api as E2eApi
from helpers.procs import kproxy_bound_port

from kproxy.kube.client import ApiClient, ApiError
from kproxy.kube.informer import Informer
from kproxy.kube.ingest import Service
from kproxy.kube.kubeconfig import TokenSource, in_cluster, load_kubeconfig
from kproxy.kube.reflector import Backoff, Reflector

testing = pytest.importorskip("controlplane_stub.apiserver.testing")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class Api(E2eApi):
    """Blocking writes to the API server (the side under test is the async reader); put_slice here
    takes (address, node) pairs, ports, labels and a trigger time, and creates or replaces."""

    def service(self, name: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
        return self.call("POST", "/api/v1/namespaces/default/services",
                         {"metadata": {"name": name, **spec.pop("meta", {})}, "spec": {"ports": ports, **spec}})

    def put_slice(self, name: str, service: str, addrs: list[tuple[str, str]], ports: list[dict[str, Any]],
                  labels: dict[str, str] | None = None, trigger: str = "") -> dict[str, Any]:
        base = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        meta: dict[str, Any] = {"name": name, "labels": {"kubernetes.io/service-name": service, **(labels or {})}}
        if trigger:
            meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
        body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
                "addressType": "IPv4", "ports": ports,
                "endpoints": [{"addresses": [ip], "nodeName": node, "conditions": {"ready": True}}
                              for ip, node in addrs]}
        try:
            cur = self.call("GET", f"{base}/{name}")
        except AssertionError:
            return self.call("POST", base, body)
        meta["resourceVersion"] = cur["metadata"]["resourceVersion"]
        return self.call("PUT", f"{base}/{name}", body)


@pytest.fixture
def api() -> Iterator[Api]:
    # A tiny watch window makes 410 reachable; frequent bookmarks make them observable.
    with testing.running_apiserver(extra_args=["--watch-cache-size", "5", "--bookmark-interval", "0.3"]) as proc:
        yield Api(proc)


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.mark.timeout(60)
def test_reflector_list_watch_bookmark_resume_and_410(api: Api) -> None:
    for i in range(5):
        api.service(f"s{i}", [{"port": 80 + i}])

    async def main() -> None:
        client = ApiClient(load_kubeconfig(api.proc.kubeconfig))
        # Errors come back as the server's Status objects.
        with pytest.raises(ApiError) as err:
            await client.get("/api/v1/namespaces/default/services/nope")
        assert (err.value.code, err.value.status.reason) == (404, "NotFound")
        bad = load_kubeconfig(api.proc.kubeconfig)
        bad.token = TokenSource("wrong-token")
        async with ApiClient(bad) as anon:
            with pytest.raises(ApiError) as err:
                await anon.get("/api/v1/services")
        assert (err.value.code, err.value.status.reason) == (401, "Unauthorized")
        # In-cluster access: a service-account directory with the token and the CA, and
        # KUBERNETES_SERVICE_HOST/PORT pointing at the server.
        sa = Path(api.proc.data_dir) / "core-sa"
        sa.mkdir()
        (sa / "token").write_text(api.proc.readonly_token)
        (sa / "ca.crt").write_bytes(Path(api.proc.ca_file).read_bytes())
        host, port = api.proc.url.removeprefix("https://").rsplit(":", 1)
        old_env = {k: os.environ.get(k) for k in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")}
        os.environ.update(KUBERNETES_SERVICE_HOST=host, KUBERNETES_SERVICE_PORT=port.rstrip("/"))
        try:
            async with ApiClient(in_cluster(sa)) as pod:
                assert b'"ServiceList"' in await pod.get("/api/v1/services")
        finally:
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        inf: Informer[Service] = Informer()
        # Fixed 1 s backoff without jitter: the blocking restarts below decide what the
        # reflector sees when it reconnects.
        r = Reflector(client, "/api/v1/services", Service, inf, page_size=2,
                      backoff=Backoff(initial=1.0, cap=1.0, jitter=0.0))
        task = asyncio.create_task(r.run())
        try:
            await _until(r.has_synced)
            # The API server's own default/kubernetes Service is listed with the test's.
            assert sorted(inf.keys()) == sorted(["default/kubernetes", *(f"default/s{i}" for i in range(5))])
            assert inf.get("default/s3").spec.ports[0].port == 83  # type: ignore[union-attr]

            api.service("s5", [{"port": 90}])
            api.call("DELETE", "/api/v1/namespaces/default/services/s0")
            await _until(lambda: "default/s5" in inf and "default/s0" not in inf)
            rv_after_events = int(r.last_resource_version)
            # A write to another resource moves the global RV; only a BOOKMARK can carry it to
            # the services watch.
            api.call("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "cm"}})
            await _until(lambda: int(r.last_resource_version) > rv_after_events)

            # kill -9 and restart, blocking the loop meanwhile; one write: the resumed watch
            # replays it from the event window, no relist.
            api.proc.kill()
            api.proc.start()
            api.service("s6", [{"port": 91}])
            await _until(lambda: "default/s6" in inf)
            assert r.lists == 1

            # Again, but with more writes than the window holds: the resume gets 410 -> relist.
            api.proc.kill()
            api.proc.start()
            for i in range(7, 14):
                api.service(f"s{i}", [{"port": 100 + i}])
            api.call("DELETE", "/api/v1/namespaces/default/services/s1")
            await _until(lambda: "default/s13" in inf and "default/s1" not in inf)
            assert r.lists == 2
            want = sorted(f"default/{it['metadata']['name']}"
                          for it in api.call("GET", "/api/v1/services")["items"])
            assert sorted(inf.keys()) == want
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()

    asyncio.run(main())


# ---- kproxy as a process ------------------------------------------------------------------------

def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _kproxy_cmd(modes: str) -> list[str]:
    code = ("import sys; from kproxy.cli import main; "
            f"sys.exit(main(modes={modes}))")
    return [sys.executable, "-c", code]


def _env(record: Path) -> dict[str, str]:
    return {**os.environ, "KPROXY_TEST_RECORD": str(record),
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}


class Records:
    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def wait(self, pred: Callable[[dict[str, Any]], bool], after: int = 0, timeout: float = 15.0,
             proc: subprocess.Popen[bytes] | None = None) -> tuple[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recs = self.all()
            for i, rec in enumerate(recs[after:], start=after):
                if pred(rec):
                    return i, rec
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"kproxy exited {proc.returncode}")
            time.sleep(0.05)
        raise AssertionError(f"no matching sync record; last: {self.all()[-1:]}")


def _now_rfc3339() -> str:
    # RFC3339Nano, as the EndpointSlice controller writes it.
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def _wait_http(url: str, pred: Callable[[int, str], bool], timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        code, body = _http(url)
        if pred(code, body):
            return body
        assert time.monotonic() < deadline, f"{url}: still {code} {body[-300:]!r}"
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_kproxy_process_syncs_health_metrics(api: Api, tmp_path: Path) -> None:
    api.call("POST", "/api/v1/nodes", {"metadata": {"name": "node-a"},
                                       "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}})
    web = api.service("web", [{"name": "http", "port": 80}])
    web_ip = web["spec"]["clusterIP"]
    api.put_slice("web-1", "web", [("10.1.0.1", "node-a"), ("10.1.0.2", "node-b")],
                  [{"name": "http", "port": 8080, "protocol": "TCP"}])
    api.service("dns", [{"name": "dns", "port": 53, "protocol": "UDP"}])
    api.service("hl", [{"port": 80}], clusterIP="None")
    api.put_slice("hl-1", "hl", [("10.1.0.9", "node-a")], [{"port": 80}],
                  labels={"service.kubernetes.io/headless": ""})
    api.service("other", [{"port": 80}], meta={"labels": {"service.kubernetes.io/service-proxy-name": "x"}})

    record = tmp_path / "syncs.jsonl"
    # Port 0: kproxy binds ports of its own choosing and logs them (a port the test found free
    # could be taken by another process on this loopback before kproxy binds it).
    args = ["--kubeconfig", api.proc.kubeconfig, "--proxy-mode", "recording", "--hostname-override", "Node-A",
            "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0",
            "--iptables-min-sync-period", "100ms", "--iptables-sync-period=1s", "--v=2"]
    log_path = tmp_path / "kproxy.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([*_kproxy_cmd("{'recording': 'core_recorder'}"), *args], env=_env(record),
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    recs = Records(record)
    try:
        hz, mp = kproxy_bound_port(log_path, "healthz", proc), kproxy_bound_port(log_path, "metrics", proc)
        i, first = recs.wait(lambda r: True, proc=proc)
        assert first["full"] and first["ok"]
        assert first["node_name"] == "node-a" and first["node_ips"] == ["10.0.0.5"]
        # Headless, proxy-name-labelled services and their endpoints never reach the proxier.
        # The API server's own default/kubernetes Service is proxied too, as on a real node.
        assert sorted(first["services"]) == ["default/dns:dns/UDP", "default/kubernetes:https/TCP",
                                             "default/web:http/TCP"]
        assert first["services"]["default/web:http/TCP"] == [[web_ip], 80, "ClusterIP", 0]
        assert first["endpoints"] == {"default/web:http/TCP": [["10.1.0.1:8080", True, True],
                                                               ["10.1.0.2:8080", True, False]],
                                      "default/kubernetes:https/TCP": [[f"127.0.0.1:{api.proc.port}", True,
                                                                        False]]}

        code, body = _http(f"http://127.0.0.1:{hz}/healthz")
        assert code == 200 and json.loads(body)["nodeEligible"] is True
        assert _http(f"http://127.0.0.1:{hz}/livez")[0] == 200
        code, metrics = _http(f"http://127.0.0.1:{mp}/metrics")
        assert code == 200 and "kubeproxy_sync_proxy_rules_duration_seconds_count" in metrics
        # The recorder reports one nat rule per service: dns, web and kubernetes.
        assert 'kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"} 3.0' in metrics
        assert _http(f"http://127.0.0.1:{mp}/proxyMode") == (200, "recording")

        # An endpoint change: a partial sync naming just that ServicePort; latency observed.
        api.put_slice("web-1", "web", [("10.1.0.1", "node-a"), ("10.1.0.3", "node-b")],
                      [{"name": "http", "port": 8080, "protocol": "TCP"}], trigger=_now_rfc3339())
        i, rec = recs.wait(lambda r: "10.1.0.3:8080" in json.dumps(r["endpoints"]), after=i + 1, proc=proc)
        assert not rec["full"] and rec["changed"] == ["default/web:http/TCP"]
        # The metric is observed right after the sync that wrote the record returns.
        metrics = _wait_http(f"http://127.0.0.1:{mp}/metrics",
                             lambda c, b: 'kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"} 1.0' in b)
        assert "kubeproxy_sync_proxy_rules_endpoint_changes_total" in metrics

        # UDP: first endpoint -> stale service; endpoint removed -> stale endpoint.
        api.put_slice("dns-1", "dns", [("10.1.0.7", "node-b")], [{"name": "dns", "port": 53, "protocol": "UDP"}])
        i, rec = recs.wait(lambda r: r["stale_services"] == ["default/dns:dns/UDP"], after=i + 1, proc=proc)
        api.call("DELETE", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/dns-1")
        i, rec = recs.wait(lambda r: bool(r["stale_endpoints"]), after=i + 1, proc=proc)
        assert rec["stale_endpoints"] == ["default/dns:dns/UDP=10.1.0.7:53"]
        assert "default/dns:dns/UDP" not in rec["endpoints"]

        # Failing syncs: retried (full) until they work; healthz 503 once a change waited
        # longer than 2 x syncPeriod (2 s), 200 again after a successful sync.
        Path(str(record) + ".fail").touch()
        api.service("late", [{"port": 81}])
        i, rec = recs.wait(lambda r: not r["ok"], after=i + 1, proc=proc)
        i, rec = recs.wait(lambda r: not r["ok"] and r["full"], after=i + 1, proc=proc)
        _wait_http(f"http://127.0.0.1:{hz}/healthz", lambda c, b: c == 503)
        assert _http(f"http://127.0.0.1:{hz}/livez")[0] == 503
        os.unlink(str(record) + ".fail")
        i, rec = recs.wait(lambda r: r["ok"], after=i + 1, proc=proc)
        assert rec["full"] and "default/late:/TCP" in rec["services"]
        _wait_http(f"http://127.0.0.1:{hz}/healthz", lambda c, b: c == 200)
        assert 'kubeproxy_proxy_healthz_total{code="503"}' in _http(f"http://127.0.0.1:{mp}/metrics")[1]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        if proc.returncode not in (0, None):
            print((tmp_path / "kproxy.log").read_text()[-3000:])


@pytest.mark.timeout(30)
def test_cleanup_and_missing_mode_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # In-process through cli.main (the process-level run is the test above): --cleanup builds
    # the chosen mode's proxier and calls cleanup(); a registered mode whose module does not
    # exist is one line and exit code 1.
    from kproxy.cli import main

    record = tmp_path / "r.jsonl"
    monkeypatch.setenv("KPROXY_TEST_RECORD", str(record))
    monkeypatch.syspath_prepend(str(HERE))
    assert main(["--proxy-mode", "recording", "--cleanup"], modes={"recording": "core_recorder"}) == 0
    assert Path(str(record) + ".cleanup").read_text() == "cleaned\n"
    capsys.readouterr()
    assert main(["--proxy-mode", "future"], modes={"future": "kproxy.proxiers.future_mode"}) == 1
    assert capsys.readouterr().err.splitlines() == [
        ("kproxy: error: --proxy-mode future: not available in this build "
         "(module kproxy.proxiers.future_mode does not exist)")]
