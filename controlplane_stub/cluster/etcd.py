"""`kproxy-cluster up --store etcd [--apiservers N]`: the control plane on a 3-member etcd cluster.

- etcd members etcd-0..2 (Debian's etcd-server; the cluster tool installs nothing) on free loopback
  ports, data under DATA/etcd, supervised like every component (a crashed member is restarted and
  rejoins with its data);
- N kproxy-apiserver processes apiserver-0..N-1 on --storage-backend etcd3, each with its own data
  dir but one PKI and one token file (copied from the first), so one kubeconfig fits them all;
- one address for all of them, 127.0.0.1:--api-port: a TCP balancer in the supervisor that sends each
  new connection to the next API server that accepts it. The kubeconfigs (DATA/kubeconfig and
  DATA/apiserver/*.kubeconfig, which kproxy and the DNS read) name that address, so clients fail
  over to a live API server by reconnecting, with no change on their side.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
from typing import TYPE_CHECKING

from controlplane_stub.apiserver import pki
from controlplane_stub.cluster import identities
from controlplane_stub.cluster.relays import pipe
from controlplane_stub.store.etcd_process import etcd_available, new_cluster

if TYPE_CHECKING:
    from controlplane_stub.cluster.supervisor import Supervisor

MEMBERS = 3


class Balancer:
    """127.0.0.1:port -> the next API server that accepts the connection (round robin)."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self._next = itertools.count()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        start = next(self._next)
        for k in range(len(self.backends)):
            port = self.backends[(start + k) % len(self.backends)]
            try:
                ur, uw = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
            except (OSError, TimeoutError):
                continue  # that API server is down: the next one
            await asyncio.gather(pipe(r, uw), pipe(ur, w))
            return
        w.close()


async def etcd_control_plane(sup: Supervisor, apiservers: int) -> None:
    if not etcd_available():
        raise RuntimeError("--store etcd: etcd is not installed (apt-get install etcd-server; ./run setup does it)")
    base = sup.dir / "etcd"
    base.mkdir(mode=0o700, exist_ok=True)
    etcd = new_cluster(str(base), MEMBERS)
    for i in range(MEMBERS):
        os.makedirs(etcd.members[i].data_dir, mode=0o700, exist_ok=True)
        sup.spawn(f"etcd-{i}", etcd.command(i))
    await asyncio.to_thread(etcd.wait_healthy, 60.0)
    sup.progress(f"etcd: {MEMBERS} members at {etcd.endpoints}")
    sup.st.components["etcd"] = etcd.endpoints

    # The balancer's address first: it is the URL of the serving certificate and of every kubeconfig.
    # Without --api-port it binds port 0 here and keeps it (a port found free and bound later could
    # be taken in between); it has no API server to send to until they are up.
    balancer = Balancer([])
    server = await asyncio.start_server(balancer.handle, "127.0.0.1", sup.args.api_port or 0, reuse_address=True,
                                        family=socket.AF_INET)
    sup.relay_servers.append(server)
    lb_port = int(server.sockets[0].getsockname()[1])
    lb_url = f"https://127.0.0.1:{lb_port}"
    flags = ["--storage-backend", "etcd3", "--etcd-servers", etcd.endpoints]
    first = sup.dir / "apiserver-0"
    urls = []
    for i in range(apiservers):
        ad = sup.dir / f"apiserver-{i}"
        ad.mkdir(mode=0o700, exist_ok=True)
        if i:
            shutil.copytree(first / "pki", ad / "pki", dirs_exist_ok=True)
            shutil.copy(first / "tokens.csv", ad / "tokens.csv")
        else:  # the components' identities (identities.py) are users of the token file all share
            identities.write_token_file(ad, [n.name for n in sup.node_nets])
        url = await asyncio.to_thread(sup.spawn_apiserver, f"apiserver-{i}", ad, 0, flags)
        urls.append(url)
        sup.progress(f"API server {i} ready at {url} (etcd)")
    balancer.backends = [int(u.rsplit(":", 1)[1]) for u in urls]

    # Kubeconfigs that name the balancer: DATA/kubeconfig and DATA/apiserver/{admin,readonly}.kubeconfig.
    users = pki.load_tokens(str(first / "tokens.csv"))
    ca = str(first / "pki" / "ca.crt")
    shared = sup.dir / "apiserver"
    shared.mkdir(mode=0o700, exist_ok=True)
    pki.write_kubeconfig(str(shared / "admin.kubeconfig"), lb_url, ca, pki.token_for(users, admin=True), "admin")
    try:
        pki.write_kubeconfig(str(shared / "readonly.kubeconfig"), lb_url, ca, pki.token_for(users, admin=False),
                             "readonly")
    except LookupError:
        pass
    shutil.copy(shared / "admin.kubeconfig", sup.st.kubeconfig)
    os.chmod(sup.st.kubeconfig, 0o600)
    sup.st.api_url, sup.st.api_port = lb_url, lb_port
    sup.st.components["apiserver"] = f"{lb_url} -> {', '.join(urls)}"
    sup.publish()
    sup.progress(f"API: {lb_url} balances {apiservers} API servers")

