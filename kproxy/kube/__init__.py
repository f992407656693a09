"""The one Kubernetes client of this repository: the node programs (kproxy, kdns) and the control
plane's controllers and agents (through controlplane_stub/client.py) all use it. Only documented API
behaviour.

- kubeconfig.py  ClusterAccess from --kubeconfig/--master/KUBECONFIG or the in-cluster service account
                 (inline certificates and keys stay in memory)
- client.py      ApiClient (HTTP/1.1 on asyncio streams): get(), request() for every verb with a body,
                 a line-by-line watch(); errors are ApiError(Status)
- types.py       ObjectMeta (snake_case fields, camelCase on the wire), ObjectList[T], Status, ...
- reflector.py   Reflector[T]: paginated list -> store.replace(), then watch -> store.apply();
                 bookmarks, resume from the last resourceVersion, relist on 410, capped jittered backoff;
                 T a trimmed Struct or dict (whole objects); a store may be asynchronous
- informer.py    Informer[T] (a keyed cache calling handler(old, new)) and SummaryStore[T] (keys only,
                 list handed over page by page) as ReflectorStores
- ingest.py      trimmed Service / EndpointSlice / Node and their conversion to kproxy.model records
                 (kproxy's own: not part of the client library the control plane may import)

A consumer declares its own trimmed msgspec Struct with `metadata: ObjectMeta` and only the fields it
reads; decoding skips everything else:

    class Svc(msgspec.Struct):
        metadata: ObjectMeta
        spec: MySpec = msgspec.field(default_factory=MySpec)

    client = ApiClient(resolve_access(kubeconfig, master))
    r = Reflector(client, "/api/v1/services", Svc, store, label_selector="!service.kubernetes.io/service-proxy-name")
    task = asyncio.create_task(r.run()); await r.wait_synced()
"""
