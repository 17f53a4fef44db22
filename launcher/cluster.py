"""`python -m launcher.cluster wait ADDRESS NODES TIMEOUT_S`: block until a Ray cluster has NODES live
nodes (what the Slurm script runs instead of a blind sleep). Exit 0 when they are there, 1 on timeout.
Imports ray only inside the function that uses it."""
from __future__ import annotations

import logging
import sys
import time


def wait_for_nodes(address: str, nodes: int, timeout_s: float) -> int:
    import os

    import ray

    node_ip = {"_node_ip_address": os.environ["SFT_NODE_IP"]} if os.environ.get("SFT_NODE_IP") else {}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **node_ip)
            break
        except Exception as err:  # the head is not up yet (connection refused, timeout)
            if time.monotonic() > deadline:
                print(f"[sft] no Ray head at {address} after {timeout_s:g} s ({type(err).__name__})", file=sys.stderr)
                return 1
            time.sleep(1)
    try:
        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= nodes:
                print(f"[sft] Ray cluster at {address}: {alive} node(s) up", flush=True)
                return 0
            if time.monotonic() > deadline:
                print(f"[sft] only {alive} of {nodes} Ray node(s) joined {address} within {timeout_s:g} s",
                      file=sys.stderr)
                return 1
            time.sleep(1)
    finally:
        ray.shutdown()


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "wait":
        print("usage: python -m launcher.cluster wait ADDRESS NODES TIMEOUT_S", file=sys.stderr)
        return 2
    return wait_for_nodes(argv[1], int(argv[2]), float(argv[3]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
