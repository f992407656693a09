"""The processes the supervisor starts from this same entry point: the controllers and node agents."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.agent import netns


def cmd_controllers(args: argparse.Namespace) -> int:
    from controlplane_stub.controllers.manager import ControllerManager, ControllerOptions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def run() -> None:
        async with api.Client(api.load_kubeconfig(args.kubeconfig), user_agent="kpc-controllers") as c:
            await ControllerManager(
                c,
                ControllerOptions(lb_pool=args.lb_pool, max_endpoints_per_slice=args.max_endpoints_per_slice),
            ).run()

    return _run_until_signal(run())


def cmd_agent(args: argparse.Namespace) -> int:
    from controlplane_stub.agent.node import AgentConfig, NodeAgent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    topo = netns.Topology(prefix=args.prefix, ip_family=args.ip_family)
    node = topo.node(args.node_index)
    cfg = AgentConfig(
        node=node,
        prefix=args.prefix,
        data_dir=Path(args.data_dir),
        catalog_file=args.image_catalog,
        zone=args.zone,
        dns_ip=args.dns_ip,
        backoff_base=args.backoff_base,
        backoff_cap=args.backoff_cap,
        backoff_reset=args.backoff_reset,
        # By default a container sees neither this agent's directory nor its kubeconfig's.
        hide_paths=args.hide_path
        or [str(Path(args.kubeconfig).resolve().parent), str(Path(args.data_dir).resolve())],
        record_file=args.record,
        kubelet_token=Path(args.kubelet_token_file).read_text().strip() if args.kubelet_token_file else "",
    )

    async def run() -> None:
        async with api.Client(
            api.load_kubeconfig(args.kubeconfig), user_agent=f"kpc-agent/{node.name}"
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
