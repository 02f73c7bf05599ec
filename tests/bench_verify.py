"""Benchmark: `verify` over a large copy while inserts go on (issue 19).

    CDC_TEST_STACK=/tmp/milvus-cdc-stack/current.json python tests/bench_verify.py \\
        [--rows 1000000] [--dim 16] [--rate 5000] [--out FILE.md]

Makes one collection (2 shards, loaded) on the source, starts a server with a task on it, inserts --rows rows
and waits for the target to hold them all; then inserts go on at --rate rows/s while `verify` runs. Measured:
the run's time, rows compared, its answer, and the CDC process's RSS before and at its peak during the run
(sampled from /proc every 0.2 s). No number is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymilvus import DataType, MilvusClient  # noqa: E402

from bench_frozen_etcd import rss_mib  # noqa: E402
from helpers import CdcServer, append_report, client, count_of, server_config, stop_and_drop, wait_until  # noqa: E402


def rows(first: int, count: int, dim: int, rng: random.Random) -> list[dict]:
    return [{"id": i, "v": [rng.random() for _ in range(dim)]} for i in range(first, first + count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    stack = json.loads(Path(os.environ["CDC_TEST_STACK"]).read_text())["endpoints"]
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    name = f"bench_verify_{int(time.time())}"
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=args.dim)
    index = MilvusClient.prepare_index_params()
    index.add_index("v", index_type="FLAT", metric_type="L2")
    workdir = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    server = CdcServer(server_config(stack, workdir), workdir).start()
    rng = random.Random(7)
    stopping = threading.Event()
    lines: list[str] = []
    try:
        task_id = server.create_task(stack["target_milvus"], collections=(name,))
        source.create_collection(name, schema=schema, shards_num=2)
        source.create_index(name, index)
        source.load_collection(name)
        started = time.monotonic()
        for first in range(0, args.rows, 10_000):
            source.insert(name, rows(first, min(10_000, args.rows - first), args.dim, rng))
        wait_until(lambda: target.has_collection(name) and count_of(target, name) == args.rows, 1800, 2.0,
                   "the copy to hold every row")
        print(f"{args.rows} rows on both sides after {time.monotonic() - started:.0f}s", flush=True)

        def live() -> None:
            next_id, due = args.rows, time.monotonic()
            while not stopping.is_set():
                batch = max(1, args.rate // 10)
                source.insert(name, rows(next_id, batch, args.dim, rng))
                next_id += batch
                due += 0.1
                time.sleep(max(0.0, due - time.monotonic()))
        inserter = threading.Thread(target=live, daemon=True)
        inserter.start()
        time.sleep(5)
        pid = server.proc.pid
        before = rss_mib(pid)
        peak = before
        server.call("verify", task_id=task_id)
        while (result := server.task(task_id)["verify"])["state"] == "running":
            peak = max(peak, rss_mib(pid))
            time.sleep(0.2)
        stopping.set()
        inserter.join(30)
        lines = [f"verify of {args.rows:,} rows (dim {args.dim}, 2 shards) under {args.rate:,} inserts/s: "
                 f"{result['state']} in {result['seconds']:.1f} s, {result['rows_compared']:,} rows compared "
                 f"({result['rows_per_second']:,} rows/s); CDC RSS {before:.0f} MiB before, peak {peak:.0f} MiB; "
                 f"differences: {result['differences']}"]
        print("\n".join(lines))
    finally:
        stopping.set()
        stop_and_drop(server, [name], source, target)
    append_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
