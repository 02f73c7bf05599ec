"""Benchmark: a task's memory while the source's etcd is out of its reach under insert load (issue 17, item 9).

    CDC_TEST_STACK=/tmp/milvus-cdc-stack/current.json python tests/bench_frozen_etcd.py \\
        [--seconds 300] [--rate 5000] [--out FILE.md]

The CDC reads the source's etcd through a relay that the benchmark cuts (the source Milvus keeps its own etcd:
a Milvus whose etcd stalls for minutes exits). Meanwhile rows go into one collection at --rate rows/s; the task
reads them from the MQ but cannot apply them (the catalog, which orders every change, promises nothing while
etcd is away), so they wait in memory up to the applier's cap (Applier.HELD_BYTES), then in the MQ. The
CDC process's RSS is sampled every second (from /proc); after --seconds the relay is restored and the time until
the target holds every row is measured, with count(*) checked exactly. No number is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import milvus_cdc  # noqa: E402
from helpers import CdcServer, TcpRelay, client, count_of, server_config, wait_until  # noqa: E402
from test_recovery import loaded_collection  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class SteadyInserts(threading.Thread):
    """--rate rows a second, in ten batches a second, until stopped."""

    def __init__(self, uri: str, name: str, rate: int):
        super().__init__(daemon=True)
        self.milvus, self.name, self.batch = client(uri), name, max(1, rate // 10)
        self.stopping, self.rows, self.errors = threading.Event(), 0, []

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping.is_set():
            try:
                self.milvus.insert(self.name, [{"id": self.rows + i, "s": "x" * 16, "v": [0.1, 0.2, 0.3, 0.4]}
                                               for i in range(self.batch)])
                self.rows += self.batch
            except Exception as exc:  # noqa: BLE001 - reported at the end
                self.errors.append(exc)
            next_at += 0.1
            time.sleep(max(0.0, next_at - time.monotonic()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--out", help="append the result as markdown here")
    args = parser.parse_args(argv)
    stack_file = os.environ.get("CDC_TEST_STACK")
    if not stack_file:
        parser.error("set CDC_TEST_STACK to a running stack's JSON (python tests/stack.py up)")
    stack = json.loads(Path(stack_file).read_text())["endpoints"]
    workdir = Path(tempfile.mkdtemp(prefix="bench-frozen-etcd-"))
    relay = TcpRelay(stack["etcd"])
    # the task rides the outage out (a fault that outlives retryTimeout pauses it: nothing would be held then)
    config = server_config(stack, workdir, **{"replication.retryTimeout": args.seconds + 300})
    config["sourceConfig"]["etcd"]["address"] = [relay.uri]
    server = CdcServer(config, workdir).start()
    name = f"frozen_{os.getpid()}"
    samples: list[tuple[float, float]] = []
    try:
        source, target = loaded_collection(stack, name)
        server.create_task(stack["target_milvus"], collections=[name])
        inserts = SteadyInserts(stack["source_milvus"], name, args.rate)
        inserts.start()
        time.sleep(10)
        before = rss_mib(server.proc.pid)
        relay.cut()
        cut_at = time.monotonic()
        while time.monotonic() - cut_at < args.seconds:
            samples.append((time.monotonic() - cut_at, rss_mib(server.proc.pid)))
            time.sleep(1)
        relay.restore()
        restored_at = time.monotonic()
        time.sleep(10)
        inserts.stopping.set()
        inserts.join()
        wait_until(lambda: count_of(target, name) == inserts.rows, 900, 2.0, "every row on the target")
        task = server.call("list")["tasks"][0]
        assert task["state"] == "Running", task
        caught_up = time.monotonic() - restored_at
        peak = max(rss for _, rss in samples)
        line = (f"| {time.strftime('%Y-%m-%d')} | {args.seconds:.0f} s | {args.rate} | {inserts.rows} | "
                f"{before:.0f} | {peak:.0f} | {samples[-1][1]:.0f} | "
                f"{milvus_cdc.Applier.HELD_BYTES >> 20} | {caught_up:.0f} s | exact |")
        print("| date | etcd cut for | rows/s | rows | RSS before MiB | peak RSS MiB | RSS at the end MiB "
              "| held-bytes cap MiB | every row on the target after | count(*) |")
        print(line)
        print("RSS every 30 s:", [round(rss) for t, rss in samples[::30]])
        if inserts.errors:
            print(f"{len(inserts.errors)} insert errors, first: {inserts.errors[0]!r}")
        if args.out:
            with open(args.out, "a") as out:
                out.write(line + "\n")
        source.drop_collection(name)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
