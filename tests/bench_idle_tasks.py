"""Benchmark: what idle tasks cost (issue 20, item 2).

    CDC_TEST_STACK=/tmp/milvus-cdc-stack/current.json python tests/bench_idle_tasks.py \\
        [--tasks 20] [--seconds 60] [--store sqlite] [--out FILE.md]

Makes --tasks collections on the source (one shard each, loaded, no rows), then one task per collection, back
to back, timing each create. Once every task runs, nothing is written for --seconds while the CPU time of the
CDC process and of the Kafka-compatible broker is sampled from /proc (user + system, in % of one core), with the
CDC's threads, RSS and open sockets. No number is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymilvus import DataType, MilvusClient  # noqa: E402

from helpers import CdcServer, append_report, client, server_config, stop_and_drop  # noqa: E402
from test_many_tasks import load_without_waiting  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def sockets(pid: int) -> int:
    return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd).startswith("socket:"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--store", default="sqlite")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    stack = json.loads(Path(os.environ["CDC_TEST_STACK"]).read_text())["endpoints"]
    source = client(stack["source_milvus"])
    prefix = f"idle_{int(time.time())}"
    names = [f"{prefix}_{i}" for i in range(args.tasks)]
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    index = MilvusClient.prepare_index_params()
    index.add_index("v", index_type="FLAT", metric_type="L2")
    for name in names:
        source.create_collection(name, schema=schema, shards_num=1)
        source.create_index(name, index)
    load_without_waiting(stack["source_milvus"], names)
    workdir = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    server = CdcServer(server_config(stack, workdir, args.store, maxTaskNum=max(100, args.tasks)), workdir).start()
    lines = []
    try:
        creates = []
        for name in names:
            started = time.monotonic()
            server.create_task(stack["target_milvus"], collections=(name,))
            creates.append(time.monotonic() - started)
        time.sleep(15)  # the copies made and loaded, every task past its first rounds
        broker = stack["pids"]["kafka"]
        pid = server.proc.pid
        cdc0, broker0, t0 = cpu_seconds(pid), cpu_seconds(broker), time.monotonic()
        time.sleep(args.seconds)
        cdc1, broker1, t1 = cpu_seconds(pid), cpu_seconds(broker), time.monotonic()
        span = t1 - t0
        lines = [f"{args.tasks} idle tasks ({args.store} store), {args.seconds:.0f} s:",
                 f"- CDC: {100 * (cdc1 - cdc0) / span:.1f}% of a core, {status(pid, 'Threads')} threads, "
                 f"RSS {status(pid, 'VmRSS') / 1024:.0f} MiB, {sockets(pid)} sockets",
                 f"- broker: {100 * (broker1 - broker0) / span:.1f}% of a core",
                 f"- create: first {creates[0]:.2f} s, last {creates[-1]:.2f} s, max {max(creates):.2f} s"]
        print("\n".join(lines))
    finally:
        stop_and_drop(server, names, source, client(stack["target_milvus"]))
    append_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
