"""/metrics in Prometheus text format, with kube-apiserver's metric names where one exists.

One CollectorRegistry per server (no process-global state), so tests can run several servers.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class APIMetrics:
    def __init__(self, revision: Callable[[], int], watchers: Callable[[], int],
                 inflight: Callable[[bool], int] | None = None, pumped: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, str, str, int], tuple[Counter, Histogram]] = {}
        self.requests = Counter("apiserver_request_total", "Requests by verb, resource, subresource and HTTP code.",
                                ["verb", "resource", "subresource", "code"], registry=self.registry)
        self.latency = Histogram("apiserver_request_duration_seconds",
                                 "Request latency (watches: until the stream starts).", ["verb", "resource"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        rev = Gauge("kproxy_apiserver_store_revision", "Current global revision of the store.",
                    registry=self.registry)
        rev.set_function(lambda: float(revision()))
        live = Gauge("apiserver_longrunning_requests", "Open watch streams.", ["verb"], registry=self.registry)
        live.labels("WATCH").set_function(lambda: float(watchers()))
        if pumped is not None:
            # Only grows; a Gauge because prometheus_client's Counter cannot read a callback.
            Gauge("kproxy_apiserver_watch_events_pumped", "Watch events written to caught-up streams by the "
                  "shared fan-out (apiserver/watch.py) instead of each stream's task.",
                  registry=self.registry).set_function(lambda: float(pumped()))
        current = Gauge("apiserver_current_inflight_requests", "Requests holding an in-flight slot, by kind.",
                        ["request_kind"], registry=self.registry)
        if inflight is not None:
            current.labels("readOnly").set_function(lambda: float(inflight(False)))
            current.labels("mutating").set_function(lambda: float(inflight(True)))
        self._rejected = Counter("apiserver_dropped_requests_total",
                                 "Requests refused with 429 because every in-flight slot was taken.",
                                 ["request_kind"], registry=self.registry)
        self.terminated_watchers = Counter("apiserver_terminated_watchers_total",
                                           "Watchers closed because they did not take events in time.",
                                           ["resource"], registry=self.registry)

    def observe(self, verb: str, resource: str, subresource: str, code: int, seconds: float) -> None:
        # The children of one label set, found once: labels() validates and looks up on every call.
        # The keys are bounded: verbs, served resources, their subresources and HTTP codes.
        key = (verb, resource, subresource, code)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(verb, resource, subresource, str(code)),
                                              self.latency.labels(verb, resource))
        children[0].inc()
        children[1].observe(seconds)

    def rejected(self, mutating: bool) -> None:
        self._rejected.labels("mutating" if mutating else "readOnly").inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
