"""Benchmark: replication throughput, lag and memory of milvus_cdc.py on the real stack.

    python tests/bench_replication.py [--rows 100000] [--dim 64] [--shards 2]

Uses the running stack of `python tests/stack.py up` (or starts one). The task is paused while the rows are
inserted on the source, then resumed: the time until the target holds every row is the CDC's catch-up
throughput, free of the source's own insert rate. Prints one JSON line of results. Not a test: numbers on a
shared machine vary; README.md records measured runs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pymilvus import DataType, MilvusClient  # noqa: E402

from helpers import CdcServer, client, count_of, server_config, wait_until  # noqa: E402
from stack import STATE_FILE, Stack  # noqa: E402


def rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident memory of a process, KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch", type=int, default=5_000)
    args = parser.parse_args()

    own_stack = None
    if STATE_FILE.exists():
        endpoints = json.loads(STATE_FILE.read_text())["endpoints"]
    else:
        own_stack = Stack(Path(tempfile.mkdtemp(prefix="milvus-cdc-bench-")))
        endpoints = own_stack.up()
    workdir = Path(tempfile.mkdtemp(prefix="milvus-cdc-bench-server-"))
    server = CdcServer(server_config(endpoints, workdir), workdir).start()
    try:
        source, target = client(endpoints["source_milvus"]), client(endpoints["target_milvus"])
        name = f"bench_{int(time.time())}"
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("label", DataType.VARCHAR, max_length=64)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=args.dim)
        task_id = server.create_task(endpoints["target_milvus"], collections=[name])
        source.create_collection(name, schema=schema, shards_num=args.shards)
        params = source.prepare_index_params()
        params.add_index("v", index_type="FLAT", metric_type="L2")
        source.create_index(name, params)
        source.load_collection(name)
        wait_until(lambda: target.has_collection(name) and
                   str(target.get_load_state(name)["state"]).endswith("Loaded"), 120, what="the copy loaded")

        server.call("pause", task_id=task_id)
        rng = random.Random(0)
        started = time.monotonic()
        for start in range(0, args.rows, args.batch):
            source.insert(name, [{"id": i, "label": f"row-{i}", "v": [rng.random() for _ in range(args.dim)]}
                                 for i in range(start, min(args.rows, start + args.batch))])
        source_seconds = time.monotonic() - started

        peak = [0]
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                peak[0] = max(peak[0], rss_kib(server.proc.pid)[0])
                time.sleep(0.1)
        sampler = threading.Thread(target=sample, daemon=True)
        rss_before = rss_kib(server.proc.pid)[0]
        sampler.start()
        started = time.monotonic()
        server.call("resume", task_id=task_id)
        wait_until(lambda: count_of(target, name, "Eventually") >= args.rows, 1800, interval=0.2,
                   what="every row on the target")
        catch_up = time.monotonic() - started
        sampling.set()
        sampler.join()
        wait_until(lambda: count_of(target, name) == args.rows, 120, what="an exact count with Strong reads")

        lags = []
        for _ in range(20):
            lags += [c["lag_seconds"] for c in server.task(task_id)["channels"]
                     if c["lag_seconds"] is not None and "dml" in c["channel"]]
            time.sleep(0.5)
        payload_mb = args.rows * (args.dim * 4 + 8 + 10) / 1e6
        print(json.dumps({
            "rows": args.rows, "dim": args.dim, "shards": args.shards,
            "source_insert_seconds": round(source_seconds, 2),
            "catch_up_seconds": round(catch_up, 2),
            "rows_per_second": round(args.rows / catch_up),
            "payload_mb_per_second": round(payload_mb / catch_up, 1),
            "server_rss_mib_idle": round(rss_before / 1024, 1),
            "server_rss_mib_peak": round(peak[0] / 1024, 1),
            "idle_lag_seconds_median": sorted(lags)[len(lags) // 2] if lags else None,
        }))
        source.release_collection(name)
        source.drop_collection(name)
        wait_until(lambda: not target.has_collection(name), 120, what="the drop")
        server.call("delete", task_id=task_id)
    finally:
        server.stop()
        if own_stack is not None:
            own_stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
