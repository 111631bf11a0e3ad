"""Zero-downtime upgrades under load: refused connections, failed requests, time to exit.

Run:  python benchmarks/bench_upgrade.py [--upgrades 20] [--keepalive-clients 4] [--new-clients 4]

Starts the HTTP server of examples/upgrade_http.py on loopback, runs client
threads that send requests over keep-alive connections (100 requests each)
and over a new connection per request, and upgrades the server
``--upgrades`` times in a row (SIGHUP to the pid in the pid file, the child
model of `fdchannel.upgrade`), each time after the serving generation
answered ``--settle`` requests.  Prints connections attempted, refused and
reset (a keep-alive connection the old process closed as the client reused
it; the request is retried on a new connection), requests and failed
requests (target: 0 refused, 0 failed), and the time from the upgrade
request (the SIGHUP) to the old process's exit: median and max, in ms.
That time includes starting a new Python interpreter and importing
fdchannel, and the old process's drain of the requests in flight.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def load_example() -> Any:
    path = os.path.join(HERE, "..", "examples", "upgrade_http.py")
    spec = importlib.util.spec_from_file_location("upgrade_http", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["upgrade_http"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrades", type=int, default=20)
    parser.add_argument("--keepalive-clients", type=int, default=4)
    parser.add_argument("--new-clients", type=int, default=4)
    parser.add_argument("--settle", type=int, default=200, help="requests served between upgrades")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    example = load_example()
    run = example.run
    figures = run(args.upgrades, args.keepalive_clients, args.new_clients, args.settle)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    times = figures["upgrade_to_exit_ms"]
    print(f"upgrades in a row:        {figures['upgrades']}")
    print(f"client threads:           {args.keepalive_clients} keep-alive, {args.new_clients} new-connection")
    print(f"connections attempted:    {figures['connections_attempted']}")
    print(f"connections refused:      {figures['refused']}")
    print(f"keep-alive resets:        {figures['reset']} (each request retried on a new connection)")
    print(f"requests answered:        {figures['requests']}")
    print(f"requests failed:          {figures['failed_requests']} {figures['failures'] or ''}")
    print(f"generations that served:  {figures['generations_seen']}")
    print(f"upgrade request -> old process exit: median {times['median']} ms, max {times['max']} ms")
    return 0 if figures["refused"] == 0 and figures["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
