"""The official `kubernetes` Python client against the server, and a watch across a server restart."""
from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver

pytestmark = pytest.mark.timeout(90)


def _api_client(api: APIServerProcess, *, retries: int = 0) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=api.kubeconfig, client_configuration=cfg)
    if retries:
        # A restarting server refuses connections for a moment; urllib3 retries the re-watch.
        cfg.retries = urllib3.Retry(total=retries, connect=retries, read=3, backoff_factor=0.2)
    return client.ApiClient(cfg)


def _svc(name: str) -> client.V1Service:
    return client.V1Service(
        metadata=client.V1ObjectMeta(name=name, labels={"app": name}),
        spec=client.V1ServiceSpec(selector={"app": name}, ports=[client.V1ServicePort(port=80, target_port=8080)]),
    )


def test_create_list_patch_delete(apiserver: APIServerProcess) -> None:
    with _api_client(apiserver) as ac:
        v1 = client.CoreV1Api(ac)
        v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="pyclient")))
        created = v1.create_namespaced_service("pyclient", _svc("hello"))
        assert created.metadata.uid and created.spec.ports[0].target_port == 8080
        with pytest.raises(ApiException) as exc:
            v1.create_namespaced_service("pyclient", _svc("hello"))
        assert exc.value.status == 409
        listed = v1.list_namespaced_service("pyclient", label_selector="app=hello")
        assert [s.metadata.name for s in listed.items] == ["hello"]
        assert int(listed.metadata.resource_version) >= int(created.metadata.resource_version)
        patched = v1.patch_namespaced_service("hello", "pyclient", {"metadata": {"labels": {"patched": "yes"}}})
        assert patched.metadata.labels == {"app": "hello", "patched": "yes"}
        apps = client.AppsV1Api(ac)
        dep = apps.create_namespaced_deployment("pyclient", {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "d"}},
                     "template": {"metadata": {"labels": {"app": "d"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})
        assert dep.spec.replicas == 1
        scale = apps.patch_namespaced_deployment_scale("d", "pyclient", {"spec": {"replicas": 3}})
        assert scale.spec.replicas == 3
        v1.delete_namespaced_service("hello", "pyclient")
        with pytest.raises(ApiException) as exc:
            v1.read_namespaced_service("hello", "pyclient")
        assert exc.value.status == 404
        v1.delete_namespace("pyclient")
        assert "pyclient" not in [n.metadata.name for n in v1.list_namespace().items]


@pytest.mark.timeout(120)
def test_watch_stream_continues_across_server_restart() -> None:
    with running_apiserver() as api, _api_client(api, retries=20) as ac:
        v1 = client.CoreV1Api(ac)
        v1.create_namespaced_service("default", _svc("before"))
        events: queue.Queue[tuple[str, str, str]] = queue.Queue()
        w = watch.Watch()

        def run() -> None:
            try:
                # No timeout_seconds: with it the client does not re-watch when a stream ends.
                # label_selector: this test's Services, not the API server's own default/kubernetes.
                for ev in w.stream(v1.list_namespaced_service, "default", label_selector="app"):
                    obj: Any = ev["object"]
                    events.put((ev["type"], obj.metadata.name, obj.metadata.resource_version))
            except Exception as e:  # noqa: BLE001 - reported to the test thread
                events.put(("EXCEPTION", repr(e), ""))

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            assert events.get(timeout=15)[:2] == ("ADDED", "before")
            api.restart()  # SIGTERM: the stream ends; the client re-watches from its last version
            v1.create_namespaced_service("default", _svc("after"))
            got = events.get(timeout=30)
            assert got[:2] == ("ADDED", "after"), got
            # a write while the server is down is impossible; one just after restart is seen once
            v1.delete_namespaced_service("before", "default")
            assert events.get(timeout=30)[:2] == ("DELETED", "before")
            assert events.empty()
        finally:
            w.stop()
            v1.create_namespaced_service("default", _svc("wake"))  # unblocks the stream so it sees stop
            t.join(15)
