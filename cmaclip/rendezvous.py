"""Roll call before a multi-node launch: every node checks in with node 0 within a time-out, or
the launch stops with one line naming the missing node(s) and the address used.

Without it, a node that never starts leaves the others waiting inside torchrun's rendezvous for
10 minutes without a word, then failing with a traceback. launchers/slurm/launch.sh runs it on
every node just before `accelerate launch` (RDZV_TIMEOUT, default 300 s):

    python -m cmaclip.rendezvous --nodes N --node-rank R --addr MAIN_ADDR --port PORT [--timeout S]

Node 0 serves a TCPStore on PORT (launch.sh uses MAIN_PORT + 1, leaving MAIN_PORT to torchrun);
the others check in with their host name; node 0 lets them all go once everyone is there.
"""
from __future__ import annotations

import argparse
import socket
import time
from datetime import timedelta

from cmaclip.errors import CmaclipError, command

POLL_S = 0.2


class RendezvousError(CmaclipError):
    """A node missing at the roll call."""


def roll_call(nodes: int, node_rank: int, addr: str, port: int, timeout: float) -> list[str]:
    """-> host names by node rank (on node 0; [] on the others). Raises RendezvousError."""
    from torch.distributed import TCPStore

    where = f"{addr}:{port}"
    if node_rank == 0:
        store = TCPStore(addr, port, is_master=True, timeout=timedelta(seconds=timeout), wait_for_workers=False)
        store.set("node0", socket.gethostname())
        deadline = time.monotonic() + timeout
        missing = list(range(1, nodes))
        while missing and time.monotonic() < deadline:
            missing = [rank for rank in missing if not store.check([f"node{rank}"])]
            time.sleep(POLL_S)
        if missing:
            joined = [f"{rank} ({store.get(f'node{rank}').decode()})" for rank in range(nodes) if rank not in missing]
            raise RendezvousError(
                f"node(s) {', '.join(map(str, missing))} of {nodes} did not join the rendezvous at {where} within "
                f"{timeout:g} s (joined: {', '.join(joined)}): did they start, and can they reach {addr}?")
        store.set("go", "1")
        while not all(store.check([f"left{rank}"]) for rank in range(1, nodes)) and time.monotonic() < deadline + 10:
            time.sleep(POLL_S)  # keep serving until everyone has read "go"
        return [store.get(f"node{rank}").decode() for rank in range(nodes)]
    failed = RendezvousError(f"node {node_rank}: no rendezvous with node 0 at {where} within {timeout:g} s: did "
                             f"node 0 start, and is {where} reachable from here?")
    deadline = time.monotonic() + timeout
    while not reachable(addr, port):  # waited here: TCPStore's own retries log pages of C++ errors
        if time.monotonic() > deadline:
            raise failed
        time.sleep(POLL_S)
    try:
        store = TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=max(1.0, deadline - time.monotonic())))
        store.set(f"node{node_rank}", socket.gethostname())
        store.wait(["go"])
        store.set(f"left{node_rank}", "1")
    except (RuntimeError, OSError):  # node 0 gave up (time-out) while this node was joining
        raise failed from None
    return []


def reachable(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=1).close()
    except OSError:
        return False
    return True


@command("cmaclip rendezvous")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cmaclip.rendezvous", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--node-rank", type=int, required=True)
    parser.add_argument("--addr", required=True, help="node 0's address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every node")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        return
    hosts = roll_call(args.nodes, args.node_rank, args.addr, args.port, args.timeout)
    if hosts:
        print(f"rendezvous at {args.addr}:{args.port}: all {args.nodes} nodes present ({', '.join(hosts)})", flush=True)


if __name__ == "__main__":
    main()
