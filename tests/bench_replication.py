"""Benchmark: what a CDC can promise, measured together with the bounds it is held to, on one stack.

    python tests/bench_replication.py [--phases bounds,catchup,lag] [--rows 100000,1000000]
                                      [--go-cdc PATH] [--out FILE.md] [--json FILE.json] ...

Phases (``--phases``, any subset, always in this order):

  bounds   Measured once per catch-up size (--rows; or --bound-rows), since the target's cost per row grows with
           the size (at a million rows it seals and flushes segments while it takes them):
           (a) READ bound: the source's DML records of one collection (N rows, dim --dim, --shards
           shards) read from Kafka with confluent-kafka and decoded as Milvus messages (MsgHeader, then
           InsertRequest): rows/s and MB/s (best of --read-passes); also fetched without decoding, and read
           through the Python CDC's own reader (kafka-python), for comparison.
           (b) WRITE bound: the same Insert messages, rewritten for a collection on the target the way the CDC
           addresses them (milvus_cdc.MessageRewriter), sent with ReplicateMessage as fast as the target takes
           them: one thread per target pchannel with a time tick after each request (as a CDC ticks), and
           1..n threads (--write-concurrency) in any order, ticked every 0.2 s up to the oldest request not yet
           answered (as the Python CDC ticks); each ends with count(*) on the target
           waiting for the last tick, which must equal the rows sent.
           LAG floor: a minimal CDC (tests/bench_bounds.py lag_floor) forwards --floor-batches batches of 100
           rows one at a time, as soon as a source time tick covers each: the live lag no CDC reading this
           source can go below.
  catchup  (c) per CDC, per --rows N, --catchup-passes times: a task is paused, N rows are inserted on the
           source, the stack is let settle (--settle-pct, as before each write-bound pass: both are measured with
           the source Milvus done flushing what it took), the task is resumed, and the time until a count(*) on
           the target, waiting until the target has consumed up to the last insert's timestamp, counts N rows is
           the catch-up time; its rate is compared with min(read bound, write bound), and with the write bound
           measured again right before the pass (--adjacent-bound). Also the CDC's idle cost (--idle-seconds).
  lag      (d) per CDC, per --lag-rates rate: rows inserted at that rate for --lag-seconds, in
           --lag-batches-per-second batches a second; each batch's lag is the time from its insert returning to
           a count(*) on the target with the insert's timestamp as guarantee_timestamp returning with every
           row written so far (when it answers a few ms early, as Milvus 2.3.5 sometimes does, count(*) is
           polled until it does); p50 / p99 / max, and the end lag: last insert returned -> count(*) equals all
           rows.
  (e) every CDC phase reports the CDC process's CPU seconds (and % of one core) and peak RSS (/proc).
  (f) with --go-cdc PATH (the binary, or its .gz) the Go milvus-cdc runs the same catchup and lag phases after
      the Python CDC has finished, been deleted and stopped (never two CDCs on one target).

Every CDC phase checks the rows exactly: count(*) on the target equals the rows inserted, and (unless
--no-key-check) every primary key is read back once. No number is asserted: a shared machine's numbers vary.
The report (markdown: date, machine, versions, tables, phase durations, problems seen) goes to stdout and to
--out; progress goes to stderr. The exit status is 1 only when a phase failed (an error, rows not exact), never
for a number.

The stack: the one whose state file (`python tests/stack.py up`'s JSON) CDC_TEST_STACK names, else a new one
started here and stopped at the end. Both CDCs replicate `*` (the Go CDC v1.0.0 accepts nothing else), so the
source should hold no other collections: the script refuses to start a task while it does, unless
--allow-other-collections.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_bounds import (
    Offsets,
    end_offsets,
    lag_floor,
    read_cdc_reader,
    read_confluent,
    replicate_base,
    write_bound,
)
from bench_cdcs import (
    CorePinning,
    GoCdc,
    ProcessMeter,
    PythonCdc,
    RowWriter,
    StackMeter,
    check_status,
    count_rows,
    hybrid_now,
    keys_exact,
    milvus_stub,
    numpy,
)
from helpers import client
from stack import Stack

PHASES = ("bounds", "catchup", "lag")
MB = 1e6


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    return [int(float(v)) for v in text.replace("_", "").split(",") if v.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="bounds,catchup,lag",
                        help="comma-separated subset of bounds,catchup,lag (default: all)")
    parser.add_argument("--rows", default="100000,1000000", help="catch-up sizes (default 100000,1000000)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10_000, help="rows per source insert in bulk phases")
    parser.add_argument("--bound-rows", help="sizes the bounds are measured at (default: those of --rows; each "
                        "catch-up is held to the bound of its size, or of the nearest size measured)")
    parser.add_argument("--read-passes", type=int, default=3)
    parser.add_argument("--write-concurrency", default="1,2,4",
                        help="sender threads for the write bound in any order, ticked every 0.2 s (default 1,2,4)")
    parser.add_argument("--write-passes", type=int, default=2,
                        help="passes of each write mode; the best counts (the machine is shared)")
    parser.add_argument("--write-request-mb", type=int, default=16,
                        help="largest ReplicateMessage request, MB (the Python CDC's chunk size: 16)")
    parser.add_argument("--catchup-passes", type=int, default=2,
                        help="catch-ups of each size per CDC, each of new rows; every pass is reported and the best "
                             "is held to the bound, itself the best of its passes (default 2)")
    parser.add_argument("--adjacent-bound", choices=("all", "best", "none"), default="all",
                        help="right before each catch-up pass, measure the write bound again: one pass of every way "
                             "(all), of the way that was best in the bounds phase (best), or not at all (none); the "
                             "stack slows as it fills, so a bound measured minutes earlier flatters it")
    parser.add_argument("--floor-batches", type=int, default=20,
                        help="batches of 100 rows the lag floor is measured on (0: skip)")
    parser.add_argument("--lag-rates", default="1000,5000,20000", help="source insert rates, rows/s")
    parser.add_argument("--lag-seconds", type=float, default=30.0, help="seconds per rate")
    parser.add_argument("--lag-batches-per-second", type=float, default=10.0)
    parser.add_argument("--settle-pct", type=float, default=25.0,
                        help="before the write bound and before each resume, wait until the stack's processes "
                             "(source and target Milvus, broker, etcd) use less than this %% of one core together "
                             "over --settle-window seconds (0: do not wait)")
    parser.add_argument("--settle-window", type=float, default=3.0)
    parser.add_argument("--settle-timeout", type=float, default=300.0,
                        help="longest wait for the stack to settle, seconds (then the phase goes on, noted)")
    parser.add_argument("--target-cpus", type=int, default=0,
                        help="pin the target Milvus to this many CPUs of its own and everything else (source "
                             "Milvus, broker, etcd, the CDCs, this script) to the rest, for the whole run: a "
                             "target on its own machine (default 0: all share every CPU)")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="the CDC's idle cost is measured this long (0: skip)")
    parser.add_argument("--go-cdc", help="the Go milvus-cdc binary (or cdc-v1.0.0.gz): also measure it")
    parser.add_argument("--go-database", default="gocdc", help="MariaDB database of the Go CDC's meta store")
    parser.add_argument("--cdcs", help="which CDCs to run: python,go (default: python, and go with --go-cdc)")
    parser.add_argument("--no-key-check", action="store_true",
                        help="check count(*) only, without reading every primary key back")
    parser.add_argument("--allow-other-collections", action="store_true",
                        help="start `*` tasks even though the source holds collections of its own")
    parser.add_argument("--out", help="also write the markdown report here")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the run's work directory (logs)")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}; choose from {', '.join(PHASES)}")
    args.rows = int_list(args.rows)
    args.bound_rows = int_list(args.bound_rows) if args.bound_rows else list(args.rows)
    args.write_concurrency = int_list(args.write_concurrency)
    args.lag_rates = int_list(args.lag_rates)
    args.cdcs = [c.strip() for c in (args.cdcs or ("python,go" if args.go_cdc else "python")).split(",")]
    if set(args.cdcs) - {"python", "go"}:
        parser.error(f"unknown CDC(s) {sorted(set(args.cdcs) - {'python', 'go'})}: choose from python, go")
    if "go" in args.cdcs and not args.go_cdc:
        parser.error("--cdcs go needs --go-cdc PATH")
    return args


# ---------------------------------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------------------------------

def machine_info() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {"cores": os.cpu_count(), "cpu": model, "ram_gib": round(mem_kib / 1024 / 1024, 1),
            "kernel": platform.release(), "load_avg": os.getloadavg()}


def versions(source_uri: str, target_uri: str) -> dict:
    import confluent_kafka
    import google.protobuf
    import grpc
    import kafka
    import pymilvus
    found = {"python": platform.python_version(), "pymilvus": pymilvus.__version__,
             "confluent-kafka": f"{getattr(confluent_kafka, '__version__', '?')} "
                                f"(librdkafka {confluent_kafka.libversion()[0]})",
             "kafka-python": kafka.__version__, "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
             "numpy": numpy.__version__ if numpy is not None else "(not installed)"}
    for side, uri in (("source Milvus", source_uri), ("target Milvus", target_uri)):
        with contextlib.suppress(Exception):
            found[side] = client(uri).get_server_version()
    return found


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def stage_means(before: dict | None, after: dict | None) -> dict[str, dict[str, float]]:
    """Per stage, how far behind the source it was between two scrapes of the stage-lag histogram: the mean, and
    the median and p99 read off its buckets (linear within a bucket)."""
    if before is None or after is None:
        return {}
    found = {}
    for stage, now in after.items():
        was = before.get(stage, {})
        count = now.get("count", 0.0) - was.get("count", 0.0)
        if count <= 0:
            continue
        buckets = sorted((float(k[3:]), v - was.get(k, 0.0)) for k, v in now.items() if k.startswith("le="))

        def quantile(q: float) -> float:
            lower, below = 0.0, 0.0
            for bound, cumulative in buckets:
                if cumulative >= q * count:
                    if math.isinf(bound):
                        return lower
                    share = (q * count - below) / (cumulative - below) if cumulative > below else 1.0
                    return lower + share * (bound - lower)
                lower, below = bound, cumulative
            return lower
        found[stage] = {"mean": (now["sum"] - was.get("sum", 0.0)) / count, "p50": quantile(0.5),
                        "p99": quantile(0.99)}
    return found


class TickWatcher(threading.Thread):
    """The source's side of a live-lag run, read the fastest way: a confluent-kafka consumer (5 ms fetch wait)
    on the collection's pchannels notes when each source time tick is read. A batch's tick is read once a tick at
    or past its insert's timestamp is read on every pchannel: before that no CDC can apply it, so what comes after
    is the CDC's (and the target's) share of the lag."""

    def __init__(self, kafka: str, pchannels: list[str]):
        super().__init__(daemon=True)
        from confluent_kafka import Consumer, TopicPartition
        self.consumer = Consumer({"bootstrap.servers": kafka, "group.id": f"bench-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 5, "fetch.min.bytes": 1})
        ends = end_offsets(kafka, pchannels)
        self.consumer.assign([TopicPartition(p, 0, ends[p]) for p in pchannels])
        self.pchannels = pchannels
        self.ticks: dict[str, list[tuple[int, float]]] = {p: [] for p in pchannels}  # (ts, time.monotonic())
        self.stopping = threading.Event()

    def run(self) -> None:
        from pymilvus.grpc_gen import common_pb2
        try:
            while not self.stopping.is_set():
                for message in self.consumer.consume(num_messages=1000, timeout=0.005):
                    if message.error():
                        continue
                    base = common_pb2.MsgHeader.FromString(message.value()).base
                    if base.msg_type == common_pb2.TimeTick:
                        self.ticks[message.topic()].append((base.timestamp, time.monotonic()))
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)

    def covered(self, ts: int) -> float | None:
        """When a tick at or past ``ts`` had been read on every pchannel (time.monotonic()), if it was."""
        times = [next((at for tick, at in self.ticks[p] if tick >= ts), None) for p in self.pchannels]
        return None if None in times else max(t for t in times if t is not None)


class FirstRows(threading.Event):
    seen: tuple[float, int] | None = None   # (seconds after resume, rows counted) once rows show


class Bench:
    def __init__(self, args, endpoints: dict, workdir: Path):
        self.args, self.endpoints, self.workdir = args, endpoints, workdir
        self.source = client(endpoints["source_milvus"])
        self.target = client(endpoints["target_milvus"])
        self.source_channel, self.source_stub = milvus_stub(endpoints["source_milvus"])
        self.target_channel, self.target_stub = milvus_stub(endpoints["target_milvus"])
        self.suffix = uuid.uuid4().hex[:6]
        self.results: dict = {"bounds": [], "cdcs": {}, "durations": [], "problems": []}
        self.bytes_per_row: float | None = None
        self.bytes_per_row_measured = False
        self.leftovers: list[str] = []   # target copies whose drop a CDC did not replicate
        self.stack_meter = StackMeter(endpoints.get("pids", {}))
        self.replays: dict[int, dict] = {}   # by size: the bound's payloads, schema and best way, for write_bound_now

    # -- bookkeeping -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str):
        log(f"--- {name}")
        started = time.monotonic()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - a failed phase is reported, the run goes on
            self.problem(f"{name} failed: {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
        finally:
            seconds = time.monotonic() - started
            self.results["durations"].append((name, seconds))
            own = ProcessMeter(os.getpid()).status_kib()
            log(f"--- {name}: {seconds:.1f} s (this script: RSS {own.get('VmRSS', 0) / 1024:.0f} MiB, peak "
                f"{own.get('VmHWM', 0) / 1024:.0f} MiB)")

    def problem(self, text: str, failure: bool = True) -> None:
        """Something to report; a ``failure`` (an error, rows not exact) also makes the exit status 1."""
        log(f"PROBLEM: {text}")
        self.results["problems"].append(text)
        if failure:
            self.results["failures"] = self.results.get("failures", 0) + 1

    def settle(self, before: str) -> dict:
        """Wait for the stack to be quiet before ``before``: the bounds and every CDC are then measured under
        the same conditions, not while the source Milvus still flushes and indexes what it has just taken."""
        args = self.args
        if args.settle_pct <= 0 or not self.stack_meter.meters:
            return {}
        waited, used = self.stack_meter.settle(args.settle_pct, args.settle_window, args.settle_timeout)
        log(f"stack settled before {before} after {waited:.1f} s (last {args.settle_window:g} s: "
            + ", ".join(f"{k} {v:.0f}%" for k, v in used.items()) + ")")
        if used["stack"] >= args.settle_pct:
            self.problem(f"the stack was still busy ({used['stack']:.0f}% of a core) after {waited:.0f} s, before "
                         f"{before}", failure=False)
        return {"settle_s": waited, "stack_pct_settled": used["stack"]}

    def payload_bytes_per_row(self) -> float:
        if self.bytes_per_row is None:
            # Not measured (no bounds phase): the size of the Insert request, plus a row's timestamp and row id.
            writer = RowWriter(self.endpoints["source_milvus"], "estimate", self.args.dim)
            try:
                self.bytes_per_row = writer.request(0, 1000).ByteSize() / 1000 + 16
            finally:
                writer.close()
        return self.bytes_per_row

    # -- source collections -------------------------------------------------------------------------------------

    def make_source_collection(self, name: str, load: bool = True):
        from pymilvus import DataType, MilvusClient
        from pymilvus.grpc_gen import milvus_pb2
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("label", DataType.VARCHAR, max_length=64)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=self.args.dim)
        self.source.create_collection(name, schema=schema, shards_num=self.args.shards)
        params = self.source.prepare_index_params()
        params.add_index("v", index_type="FLAT", metric_type="L2")
        self.source.create_index(name, params)
        if load:
            self.source.load_collection(name)
        described = self.source_stub.DescribeCollection(
            milvus_pb2.DescribeCollectionRequest(collection_name=name), timeout=60)
        check_status(described.status, f"describe {name}")
        return described

    def wait_copy_loaded(self, name: str, timeout: float = 300.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with contextlib.suppress(Exception):
                if self.target.has_collection(name) and \
                        str(self.target.get_load_state(name)["state"]).endswith("Loaded"):
                    return time.monotonic() - started
            time.sleep(0.3)
        raise RuntimeError(f"the copy of {name} was not created and loaded on the target within {timeout:.0f} s")

    def drop_replicated(self, name: str, timeout: float = 120.0) -> None:
        """Drop a source collection while its CDC runs, and wait for the drop to reach the target.

        Dropped while loaded, with no release first: the Go CDC v1.0.0 applies a ReleaseCollection (replicate
        channel) that it reads after the drop (DML channels) to the dropped copy, retries it forever, and then
        applies no later operation (a new collection's index and load never reach the target)."""
        self.settle(f"dropping {name}")  # see write_bound: a drop during a big flush can crash Milvus 2.3.5
        self.source.drop_collection(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if not self.target.has_collection(name):
                    return
            time.sleep(0.5)
        self.problem(f"the drop of {name} did not reach the target within {timeout:.0f} s: dropped there by the "
                     "benchmark after the CDC stopped")
        self.leftovers.append(name)

    def abandon(self, cdc, task_id: str | None, name: str) -> None:
        """A phase failed: its task running again, its collection dropped (on the target too, one way or
        another), so the next phase starts clean."""
        with contextlib.suppress(Exception):
            if task_id is not None and cdc.state(task_id) == "Paused":
                cdc.resume(task_id)
        try:
            self.drop_replicated(name, timeout=60)
        except Exception as exc:  # noqa: BLE001
            self.problem(f"could not drop {name} after the failure: {exc}")

    def drop_target_leftovers(self) -> None:
        """Copies whose drop a CDC did not replicate: dropped on the target as the CDC would (drop messages,
        DropCollection with replicateInfo, a tick). Only while no CDC writes to the target."""
        from pymilvus.grpc_gen import common_pb2, milvus_pb2

        import milvus_cdc
        for name in self.leftovers:
            try:
                described = self.target_stub.DescribeCollection(
                    milvus_pb2.DescribeCollectionRequest(collection_name=name), timeout=60)
                if described.status.code != 0 or described.status.error_code != 0:
                    continue
                target = milvus_cdc.TargetCollection(
                    id=described.collectionID, db_name="default", name=name, created_ts=described.created_timestamp,
                    vchannels=sorted(described.virtual_channel_names, key=milvus_cdc.shard_index), fields={},
                    partitions={})
                ts = hybrid_now()
                for pchannel, message in milvus_cdc.MessageRewriter.drop_collection(target, ts, ts):
                    check_status(self.target_stub.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(
                        channel_name=pchannel, Msgs=[message]), timeout=60).status, f"drop message to {pchannel}")
                answer = self.target_stub.DropCollection(milvus_pb2.DropCollectionRequest(
                    base=replicate_base(common_pb2.DropCollection, ts), collection_name=name), timeout=60)
                check_status(answer, f"drop {name} on the target")
                for pchannel in sorted(set(target.pchannels)):
                    self.target_stub.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(
                        channel_name=pchannel, Msgs=[milvus_cdc.MessageRewriter.time_tick(ts + 1)]), timeout=60)
            except Exception as exc:  # noqa: BLE001
                self.problem(f"could not drop leftover {name} on the target: {exc}")
        self.leftovers = []

    def exact(self, name: str, expected: int, guarantee_ts: int) -> dict:
        """count(*) on the target once it has consumed up to the last write, and every key once."""
        counted = count_rows(self.target_stub, name, guarantee_ts=guarantee_ts, timeout=300)
        deadline = time.monotonic() + 10
        while counted < expected and time.monotonic() < deadline:  # 2.3.5 may answer a few ms early (live lag)
            time.sleep(0.05)
            counted = count_rows(self.target_stub, name)
        check = {"count": counted, "expected": expected, "count_ok": counted == expected}
        if not self.args.no_key_check:
            ok, detail = keys_exact(self.target, name, 0, expected)
            check.update(keys_ok=ok, keys=detail)
        check["ok"] = check["count_ok"] and check.get("keys_ok", True)
        if not check["ok"]:
            self.problem(f"{name}: rows not exact on the target: count(*) {counted}, expected {expected}"
                         f"{'; ' + check['keys'] if 'keys' in check else ''}")
        return check

    # -- (a), (b) ------------------------------------------------------------------------------------------------

    def bound_for(self, rows: int) -> dict | None:
        """The bounds measured at ``rows``, else at the nearest size measured."""
        measured = [b for b in self.results["bounds"] if b.get("min_rows_per_s")]
        return min(measured, key=lambda b: abs(math.log(b["rows"] / rows)), default=None)

    def run_bounds(self, rows: int, floor: bool) -> None:
        args, kafka = self.args, self.endpoints["kafka"]
        name = f"bench_bounds_{rows}_{self.suffix}"
        described = self.make_source_collection(name, load=False)
        try:
            pchannels = sorted(described.physical_channel_names)
            offsets = Offsets(start=end_offsets(kafka, pchannels))
            writer = RowWriter(self.endpoints["source_milvus"], name, args.dim)
            try:
                _, insert_seconds = writer.insert_rows(0, rows, args.batch)
            finally:
                writer.close()
            offsets.end = end_offsets(kafka, pchannels)
            bounds = {"rows": rows, "source_insert_rows_per_s": rows / insert_seconds}
            self.results["bounds"].append(bounds)
            log(f"source took {rows} rows in {insert_seconds:.1f} s")
            reads, payloads = [], []
            reads.append(read_confluent(kafka, offsets, described.collectionID, decode=False))
            for i in range(max(1, args.read_passes)):
                reads.append(read_confluent(kafka, offsets, described.collectionID, keep=payloads if i == 0 else None))
            reads.append(read_cdc_reader(kafka, offsets, described.collectionID))
            for r in reads:
                log(f"read {r.how}: {r.rows} rows, {r.records} records in {r.seconds:.2f} s = "
                    f"{r.rows / r.seconds:,.0f} rows/s, {r.mb_per_s:.1f} MB/s")
                if "+ decode" in r.how and r.rows != rows:
                    self.problem(f"read bound ({r.how}) decoded {r.rows} rows, expected {rows}")
            bounds["reads"] = [{**asdict(r), "rows_per_s": r.rows_per_s if r.rows else None,
                                "mb_per_s": r.mb_per_s} for r in reads]
            decoded = [r for r in reads if r.how == "confluent-kafka + decode"]
            best = max(decoded, key=lambda r: r.rows_per_s)
            bounds["read"] = {"rows_per_s": best.rows_per_s, "mb_per_s": best.mb_per_s}
            self.bytes_per_row, self.bytes_per_row_measured = best.payload_bytes / best.rows, True

            writes = []
            modes = [("ticks", len(pchannels))] + [("end", c) for c in args.write_concurrency]
            for mode, concurrency in modes:
                passes = [w for _ in range(max(1, args.write_passes))
                          if (w := self.write_pass(described.schema, payloads, mode == "ticks", concurrency,
                                                   "a write-bound pass")) is not None]
                if not passes:
                    continue
                w = max(passes, key=lambda x: x.rows_per_s)
                writes.append({**asdict(w), "rows_per_s": w.rows_per_s, "mb_per_s": w.mb_per_s,
                               "send_rows_per_s": w.send_rows_per_s, "passes": len(passes),
                               "all_rows_per_s": [x.rows_per_s for x in passes]})
            bounds["writes"] = writes
            if not writes:
                raise RuntimeError("every write-bound pass failed (see the problems above)")
            best_write = max(writes, key=lambda w: w["rows_per_s"])
            if "catchup" in args.phases and args.adjacent_bound != "none":
                ways = [(w["tick_each"], w["concurrency"]) for w in writes]
                if args.adjacent_bound == "best":
                    ways = [(best_write["tick_each"], best_write["concurrency"])]
                self.replays[rows] = {"payloads": payloads, "schema": described.schema, "ways": ways}
            del payloads
            bounds["write"] = {"rows_per_s": best_write["rows_per_s"], "mb_per_s": best_write["mb_per_s"]}
            bounds["min_rows_per_s"] = min(bounds["read"]["rows_per_s"], bounds["write"]["rows_per_s"])
            if floor and args.floor_batches > 0:
                writer = RowWriter(self.endpoints["source_milvus"], name, args.dim, seed=2)
                try:
                    samples = lag_floor(kafka, self.endpoints["target_milvus"], writer, described, rows,
                                        batches=args.floor_batches)
                finally:
                    writer.close()
                totals = [x.total_s for x in samples]
                self.results["floor"] = {"batches": len(samples), "p50_s": pct(totals, 50), "p99_s": pct(totals, 99),
                                   "max_s": max(totals),
                                   "source_tick_p50_s": pct([x.source_tick_s for x in samples], 50),
                                   "target_p50_s": pct([x.target_s for x in samples], 50)}
                f = self.results["floor"]
                log(f"lag floor ({len(samples)} batches): p50 {f['p50_s']:.3f} s, p99 {f['p99_s']:.3f} s, max "
                    f"{f['max_s']:.3f} s (source tick read p50 {f['source_tick_p50_s']:.3f} s, target p50 "
                    f"{f['target_p50_s']:.3f} s)")
        finally:
            self.source.drop_collection(name)

    # -- (c), (d), (e) per CDC -----------------------------------------------------------------------------------

    def run_cdc(self, cdc) -> None:
        args = self.args
        result = self.results["cdcs"].setdefault(cdc.label, {"catchup": [], "lag": []})
        others = [n for n in self.source.list_collections()]
        if others and not args.allow_other_collections:
            raise RuntimeError(f"the source holds collections {others[:10]}: a `*` task would replicate them too "
                               "(drop them, or pass --allow-other-collections)")
        self.settle(f"starting the {cdc.label} CDC")
        started = time.monotonic()
        try:
            cdc.start()
            result["version"] = cdc.version()
            meter = ProcessMeter(cdc.pid())
            result["rss_start_mib"] = meter.status_kib().get("VmRSS", 0) / 1024
            task_id = cdc.create_task()
            deadline = time.monotonic() + 60
            while cdc.state(task_id) != "Running":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cdc.label} task not Running: {cdc.state(task_id)}")
                time.sleep(0.3)
        except BaseException:
            log(f"{cdc.label} did not start; its log ends:\n{cdc.log_tail()}")
            cdc.stop()
            raise
        self.results["durations"].append((f"{cdc.label}: start, create the `*` task", time.monotonic() - started))
        try:
            if "catchup" in args.phases:
                for i, rows in enumerate(args.rows):
                    for run in range(max(1, args.catchup_passes)):
                        with self.phase(f"{cdc.label}: catch-up {rows:,} rows, pass {run + 1}"):
                            result["catchup"].append(self.catch_up(cdc, meter, task_id, rows, run,
                                                                   idle=i == 0 and run == 0))
            if "lag" in args.phases:
                with self.phase(f"{cdc.label}: live lag"):
                    result["lag"] = self.live_lag(cdc, meter)
        finally:
            with self.phase(f"{cdc.label}: stop"):
                with contextlib.suppress(Exception):
                    result["rss_end_mib"] = meter.status_kib().get("VmRSS", 0) / 1024
                try:
                    if cdc.state(task_id) == "Paused":
                        cdc.resume(task_id)
                    cdc.delete(task_id)
                except Exception as exc:  # noqa: BLE001
                    self.problem(f"{cdc.label}: deleting its task failed: {exc}")
                log_tail = cdc.log_tail(200000)
                result["log_errors"] = sum(1 for line in log_tail.splitlines()
                                           if "[ERROR]" in line or " ERROR " in line)
                cdc.stop()
                self.drop_target_leftovers()

    def catch_up(self, cdc, meter: ProcessMeter, task_id: str, rows: int, run: int, idle: bool) -> dict:
        args = self.args
        name = f"bench_{cdc.label}_catchup_{rows}_{run}_{self.suffix}"
        self.make_source_collection(name)
        try:
            copy_seconds = self.wait_copy_loaded(name)
            entry: dict = {"rows": rows, "pass": run + 1, "copy_created_and_loaded_s": copy_seconds}
            log(f"{cdc.label}: copy of {name} created and loaded on the target after {copy_seconds:.1f} s")
            if idle and args.idle_seconds > 0:
                window = meter.window()
                time.sleep(args.idle_seconds)
                entry["idle"] = window.stop()
                self.results["cdcs"][cdc.label]["idle"] = entry["idle"]
                log(f"{cdc.label}: idle {entry['idle']['cpu_pct']:.1f}% of a core, "
                    f"RSS {entry['idle']['rss_end_mib']:.0f} MiB")
            cdc.pause(task_id)
            window = meter.window()
            writer = RowWriter(self.endpoints["source_milvus"], name, args.dim)
            try:
                last_ts, insert_seconds = writer.insert_rows(0, rows, args.batch)
            finally:
                writer.close()
            entry["source_insert_s"] = insert_seconds
            entry["paused"] = window.stop()
            log(f"{cdc.label}: {rows:,} rows inserted on the source in {insert_seconds:.1f} s "
                f"({rows / insert_seconds:,.0f} rows/s) while the task was paused")
            now = self.write_bound_now(rows)
            if now is not None:
                entry["write_bound_now"] = now
            entry.update(self.settle(f"resuming {cdc.label}'s catch-up of {rows:,} rows"))
            stack_mark = self.stack_meter.start()
            window = meter.window()
            calls_before = cdc.replicate_call_seconds()
            started = time.monotonic()
            cdc.resume(task_id)
            timeout = max(600.0, rows / 500)
            first = self.first_rows(name, started, timeout)
            # The end: a count(*) waiting on the target until it has consumed up to the last insert's timestamp
            # (as the write bound's ends), then polled briefly in case it answered a few ms early.
            counted = count_rows(self.target_stub, name, guarantee_ts=last_ts, timeout=timeout)
            while counted < rows:
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"{cdc.label}: only {counted} of {rows} rows on the target "
                                       f"after {timeout:.0f} s")
                time.sleep(0.02)
                counted = count_rows(self.target_stub, name)
            seconds = time.monotonic() - started
            first.set()
            entry["catchup"] = window.stop()
            entry["stack_pct"] = self.stack_meter.since(stack_mark)
            calls_after = cdc.replicate_call_seconds()
            if calls_before is not None and calls_after is not None:
                entry["replicate_call_s"] = calls_after - calls_before
            entry["catchup_s"] = seconds
            entry["rows_per_s"] = rows / seconds
            entry["mb_per_s"] = rows * self.payload_bytes_per_row() / MB / seconds
            entry["first_rows_s"] = first.seen[0] if first.seen else None
            if first.seen and seconds > first.seen[0]:
                entry["after_first_rows_per_s"] = (rows - first.seen[1]) / (seconds - first.seen[0])
            held_to = self.bound_for(rows)
            bound = held_to["min_rows_per_s"] if held_to else None
            entry["bound_rows"] = held_to["rows"] if held_to else None
            entry["ratio_to_bound"] = entry["rows_per_s"] / bound if bound else None
            if now is not None and held_to:
                entry["ratio_to_bound_now"] = entry["rows_per_s"] / min(held_to["read"]["rows_per_s"],
                                                                        now["rows_per_s"])
            log(f"{cdc.label}: caught up {rows:,} rows in {seconds:.2f} s = {entry['rows_per_s']:,.0f} rows/s "
                f"(first rows after {entry['first_rows_s'] or 0:.2f} s); CPU {entry['catchup']['cpu_s']:.1f} s, "
                f"peak RSS {entry['catchup']['peak_rss_mib']:.0f} MiB")
            entry["exact"] = self.exact(name, rows, last_ts)
            self.drop_replicated(name)
            return entry
        except BaseException:
            self.abandon(cdc, task_id, name)
            raise

    def write_pass(self, schema, payloads: list[bytes], tick_each: bool, concurrency: int, before: str):
        """One pass of the write bound on a settled stack, logged and checked; None (a problem noted) when it
        failed, so that the other passes still measure."""
        self.settle(before)
        try:
            w = write_bound(self.endpoints["target_milvus"], schema, self.args.shards, payloads, concurrency,
                            request_bytes=self.args.write_request_mb << 20, tick_each=tick_each,
                            before_drop=lambda: self.settle("dropping a write-bound copy"), meter=self.stack_meter)
        except Exception as exc:  # noqa: BLE001 - one pass lost, the other passes still measure
            way = "a tick after each request" if tick_each else "ticks every 0.2 s"
            self.problem(f"{before} ({way}, {concurrency} thread(s)) failed: {type(exc).__name__}: "
                         f"{str(exc)[:300]}", failure=False)
            return None
        how = "a tick after each request, one thread per pchannel" if w.tick_each else "ticks every 0.2 s"
        log(f"write ({before}), {how}, {w.concurrency} thread(s), {w.requests} requests: sent in "
            f"{w.send_seconds:.2f} s, visible in {w.visible_seconds:.2f} s = {w.rows_per_s:,.0f} rows/s, "
            f"{w.mb_per_s:.1f} MB/s; count(*) {w.count}")
        if w.count != w.rows:
            self.problem(f"write bound ({w.concurrency} threads): count(*) {w.count} on the target, "
                         f"{w.rows} rows sent")
        return w

    def write_bound_now(self, rows: int) -> dict | None:
        """The write bound again, one pass of each way kept for this size (or the nearest measured), on the stack
        as it is now: the best of them is the bound the catch-up that follows is also held to."""
        if not self.replays:
            return None
        size = min(self.replays, key=lambda r: abs(math.log(r / rows)))
        replay = self.replays[size]
        passes = [w for tick_each, concurrency in replay["ways"]
                  if (w := self.write_pass(replay["schema"], replay["payloads"], tick_each, concurrency,
                                           f"the write bound ({size:,} rows) right before a catch-up")) is not None]
        if not passes:
            return None
        best = max(passes, key=lambda w: w.rows_per_s)
        return {"rows": size, "rows_per_s": best.rows_per_s, "tick_each": best.tick_each,
                "concurrency": best.concurrency, "all_rows_per_s": [w.rows_per_s for w in passes]}

    def first_rows(self, name: str, started: float, timeout: float) -> "FirstRows":
        """Polls count(*) (every 0.2 s, from a thread of its own) until the first rows of a catch-up show."""
        watch = FirstRows()

        def poll():
            while not watch.is_set() and time.monotonic() - started < timeout:
                with contextlib.suppress(Exception):
                    counted = count_rows(self.target_stub, name)
                    if counted:
                        watch.seen = (time.monotonic() - started, counted)
                        return
                watch.wait(0.2)
        threading.Thread(target=poll, daemon=True).start()
        return watch

    def live_lag(self, cdc, meter: ProcessMeter) -> list[dict]:
        from pymilvus.grpc_gen import milvus_pb2
        args = self.args
        name = f"bench_{cdc.label}_lag_{self.suffix}"
        self.make_source_collection(name)
        try:
            self.wait_copy_loaded(name)
            writer = RowWriter(self.endpoints["source_milvus"], name, args.dim, seed=1)
            entries, next_id, last_ts = [], 0, 0
            pchannels = sorted(self.source_stub.DescribeCollection(milvus_pb2.DescribeCollectionRequest(
                collection_name=name), timeout=60).physical_channel_names)
            try:
                for rate in args.lag_rates:
                    entry, next_id, last_ts = self.one_rate(cdc, meter, writer, name, rate, next_id, pchannels)
                    entries.append(entry)
            finally:
                writer.close()
            if entries:
                entries[-1]["exact"] = self.exact(name, next_id, last_ts)
            self.drop_replicated(name)
            return entries
        except BaseException:
            self.abandon(cdc, None, name)
            raise

    def one_rate(self, cdc, meter: ProcessMeter, writer: RowWriter, name: str, rate: int, first_id: int,
                 pchannels: list[str]):
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        args = self.args
        batch = max(1, round(rate / args.lag_batches_per_second))
        interval = batch / rate
        batches = max(1, round(args.lag_seconds * rate / batch))
        vectors = writer.random_vectors(batch)
        lags: list[float | None] = [None] * batches
        visible_at: list[float | None] = [None] * batches   # time.monotonic() the batch was counted
        batch_ts: list[int] = [0] * batches
        returned_at: list[float] = [0.0] * batches
        late: list[tuple] = []      # (batch, counted, expected, first answer s, visible s)
        failures: list[str] = []
        lock = threading.Lock()
        done = threading.Semaphore(0)
        followers = ThreadPoolExecutor(4)

        def follow(k: int, returned: float, expected: int, counted: int, answered: float) -> None:
            """The guarantee-ts query answered with fewer rows than written up to batch k (Milvus 2.3.5 can
            answer while the last insert before the tick is still being applied): poll until they are counted."""
            try:
                while counted < expected:
                    if time.monotonic() - returned > 600:
                        raise RuntimeError(f"rows of batch {k} not visible after 600 s")
                    time.sleep(0.005)
                    counted = count_rows(self.target_stub, name)
                at = time.monotonic()
                with lock:
                    lags[k], visible_at[k] = at - returned, at
                    late.append((k, round(answered - returned, 3), round(at - answered, 3)))
            except Exception as exc:  # noqa: BLE001
                with lock:
                    failures.append(f"batch {k}: {exc}")
            finally:
                done.release()

        def visible(k: int, returned: float, expected: int, future) -> None:
            at = time.monotonic()
            try:
                answer = future.result()
                if answer.status.code != 0 or answer.status.error_code != 0:
                    raise RuntimeError(answer.status.reason)
                counted = answer.fields_data[0].scalars.long_data.data[0]
                if counted < expected:
                    followers.submit(follow, k, returned, expected, counted, at)
                    return
                with lock:
                    lags[k], visible_at[k] = at - returned, at
            except Exception as exc:  # noqa: BLE001
                with lock:
                    failures.append(f"batch {k}: {exc}")
            done.release()

        log(f"{cdc.label}: {rate:,} rows/s for {args.lag_seconds:.0f} s ({batches} batches of {batch})")
        window = meter.window()
        calls_before, stages_before = cdc.replicate_call_seconds(), cdc.stage_lags()
        watcher = TickWatcher(self.endpoints["kafka"], pchannels)
        watcher.start()
        started = time.monotonic()
        last_ts = 0
        for k in range(batches):
            delay = started + k * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            last_ts = batch_ts[k] = writer.insert(writer.request(first_id + k * batch, batch, vectors))
            returned = returned_at[k] = time.monotonic()
            request = milvus_pb2.QueryRequest(
                collection_name=name, expr="", output_fields=["count(*)"], use_default_consistency=False,
                consistency_level=common_pb2.ConsistencyLevel.Customized, guarantee_timestamp=last_ts)
            future = self.target_stub.Query.future(request, timeout=600)
            future.add_done_callback(lambda f, k=k, r=returned, e=first_id + (k + 1) * batch: visible(k, r, e, f))
        last_returned = time.monotonic()
        insert_seconds = last_returned - started
        total = first_id + batches * batch
        while count_rows(self.target_stub, name) < total:
            if time.monotonic() - last_returned > 600:
                raise RuntimeError(f"{cdc.label}: rows of the {rate} rows/s run not all visible after 600 s")
            time.sleep(0.02)
        end_lag = time.monotonic() - last_returned
        for _ in range(batches):
            if not done.acquire(timeout=600):
                failures.append("a visibility query did not answer within 600 s")
                break
        followers.shutdown(wait=False)
        watcher.stop()
        source_share, cdc_share = [], []
        for k in range(batches):
            covered = watcher.covered(batch_ts[k])
            if covered is not None and visible_at[k] is not None:
                source_share.append(covered - returned_at[k])
                cdc_share.append(visible_at[k] - covered)  # type: ignore[operator]
        stats = window.stop()
        calls_after, stages_after = cdc.replicate_call_seconds(), cdc.stage_lags()
        measured = [v for v in lags if v is not None]
        entry = {"rate": rate, "seconds": args.lag_seconds, "batch": batch, "batches": batches,
                 "achieved_rows_per_s": batches * batch / insert_seconds, "end_lag_s": end_lag,
                 "p50_s": pct(measured, 50) if measured else None, "p99_s": pct(measured, 99) if measured else None,
                 "max_s": max(measured) if measured else None,
                 "mean_s": statistics.fmean(measured) if measured else None, "measured": len(measured),
                 "late": sorted(late), "late_max_s": max((x[2] for x in late), default=None), "cdc": stats,
                 "replicate_call_s": calls_after - calls_before if None not in (calls_before, calls_after) else None,
                 "stages": stage_means(stages_before, stages_after),
                 "tick_read_p50_s": pct(source_share, 50) if source_share else None,
                 "tick_read_p99_s": pct(source_share, 99) if source_share else None,
                 "after_tick_p50_s": pct(cdc_share, 50) if cdc_share else None,
                 "after_tick_p99_s": pct(cdc_share, 99) if cdc_share else None,
                 "count_at_end": count_rows(self.target_stub, name),
                 "expected_at_end": total}
        if failures:
            self.problem(f"{cdc.label} at {rate} rows/s: {len(failures)} visibility queries failed: {failures[:3]}")
        if late:
            extra = [x[2] for x in late]
            log(f"{cdc.label} at {rate} rows/s: for {len(late)} batches the query waiting for the write's "
                f"timestamp answered before counting all of them; counted {max(extra):.3f} s later at most")
        if entry["count_at_end"] != total:
            self.problem(f"{cdc.label} at {rate} rows/s: count(*) {entry['count_at_end']}, expected {total}")
        if entry["achieved_rows_per_s"] < 0.95 * rate:
            self.problem(f"{cdc.label}: the source took only {entry['achieved_rows_per_s']:,.0f} of {rate:,} rows/s",
                         failure=False)
        if entry["stages"]:
            log(f"{cdc.label} stages (mean/p50/p99): " + ", ".join(
                f"{k} {v['mean']:.3f}/{v['p50']:.3f}/{v['p99']:.3f}" for k, v in entry["stages"].items()))
        if cdc_share:
            log(f"{cdc.label}: the source's tick read (fastest reader) p50 {entry['tick_read_p50_s']:.3f} s p99 "
                f"{entry['tick_read_p99_s']:.3f} s after the insert returned; visible after it: p50 "
                f"{entry['after_tick_p50_s']:.3f} s, p99 {entry['after_tick_p99_s']:.3f} s")
        log(f"{cdc.label}: {rate:,} rows/s (achieved {entry['achieved_rows_per_s']:,.0f}): lag p50 "
            f"{entry['p50_s']:.2f} s, p99 {entry['p99_s']:.2f} s, max {entry['max_s']:.2f} s, end lag "
            f"{end_lag:.2f} s; CPU {stats['cpu_pct']:.0f}% of a core, peak RSS {stats['peak_rss_mib']:.0f} MiB")
        return entry, total, last_ts


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------

def fmt(value, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "?"
    return f"{value:,.{digits}f}{suffix}"


def report(bench: Bench, args, machine: dict, found_versions: dict, stack_note: str, total_s: float) -> str:
    r = bench.results
    load_start = ", ".join(f"{v:.1f}" for v in machine["load_avg"])
    load_end = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    cdcs = "; ".join(f"{label}: {c.get('version', '?')}" for label, c in r["cdcs"].items()) or "none"
    measured = "" if bench.bytes_per_row_measured else " (estimated: no bounds phase)"
    out = [f"# Replication benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "",
           (f"- machine: {machine['cores']} cores ({machine['cpu']}), {machine['ram_gib']} GiB RAM, Linux "
           f"{machine['kernel']}; load average at start {load_start}, at end {load_end}"),
           f"- stack: {stack_note}",
           "- versions: " + "; ".join(f"{k} {v}" for k, v in found_versions.items()),
           f"- CDCs: {cdcs}",
           (f"- data: dim {args.dim}, {args.shards} shards, fields id (int64 key), label (varchar), v (float "
           f"vector); bulk inserts of {args.batch:,} rows; MB = the source's Insert messages as stored in Kafka, "
           f"{fmt(bench.bytes_per_row, 1)} bytes a row{measured}"),
           f"- phases: {', '.join(args.phases)}; whole run {total_s / 60:.1f} min", ""]
    for b in r["bounds"]:
        if not b.get("reads"):
            continue
        out += [f"## Bounds ({b['rows']:,} rows; the source took them at {b['source_insert_rows_per_s']:,.0f} rows/s)",
                "", "| bound | how | rows/s | MB/s | seconds |", "| --- | --- | ---: | ---: | ---: |"]
        for read in b["reads"]:
            out.append(f"| read | {read['how']} | {fmt(read['rows_per_s'])} | {fmt(read['mb_per_s'], 1)} | "
                       f"{read['seconds']:.2f} |")
        for w in b.get("writes", []):
            how = ("ReplicateMessage, 1 thread per pchannel, a tick after each request" if w["tick_each"] else
                   f"ReplicateMessage, {w['concurrency']} thread(s) in any order, ticks every 0.2 s")
            passes = ", ".join(fmt(x) for x in w.get("all_rows_per_s", []))
            passes = f"; passes {passes} rows/s" if len(w.get("all_rows_per_s", [])) > 1 else ""
            stack = (f"; source / target Milvus / broker {stack_pct_text(w['stack_pct'])}% core"
                     if w.get("stack_pct") else "")
            out.append(f"| write | {how} ({w['requests']} requests, all answered after {w['send_seconds']:.2f} s = "
                       f"{fmt(w['send_rows_per_s'])} rows/s{passes}{stack}) | {fmt(w['rows_per_s'])} | "
                       f"{fmt(w['mb_per_s'], 1)} | {w['visible_seconds']:.2f} |")
        if b.get("write"):
            out += ["", (f"READ bound (a), the best confluent-kafka + decode pass: **{fmt(b['read']['rows_per_s'])} "
                    f"rows/s, {fmt(b['read']['mb_per_s'], 1)} MB/s**. WRITE bound (b), the best way and pass until "
                    f"count(*) on the target has every row: **{fmt(b['write']['rows_per_s'])} rows/s, "
                    f"{fmt(b['write']['mb_per_s'], 1)} MB/s**. min(a, b) = **{fmt(b['min_rows_per_s'])} rows/s**. "
                    f"Both are measured on this stack, on {b['rows']:,} rows, while the machine does whatever else it "
                    "does: a CDC above 1.0 x min(a, b) met a quieter moment (or a larger run, whose fixed costs "
                    "weigh less). The bound tells where the ceiling is, not to the percent.")]
        out.append("")
    if r.get("floor"):
        f = r["floor"]
        out += [(f"LAG floor (a minimal CDC forwarding {f['batches']} batches of 100 rows one at a time, each "
                f"as soon as a source tick covers it): p50 **{f['p50_s']:.2f} s**, p99 {f['p99_s']:.2f} s, max "
                f"{f['max_s']:.2f} s; of the p50, {f['source_tick_p50_s']:.2f} s until the source's tick is read "
                f"(the source ticks every 200 ms) and {f['target_p50_s']:.2f} s on the target."), ""]
    catchups = [(label, e) for label, c in r["cdcs"].items() for e in c["catchup"]]
    if catchups:
        out += ["## Catch-up (task paused, rows inserted, resumed; until count(*) on the target has them all)", "",
                ("| CDC | rows | pass | source insert s | catch-up s | first rows after s | rows/s | MB/s "
                "| / min(a, b) | b right before | / min(a, b before) "
                "| in ReplicateMessage s | CPU s | CPU % core | peak RSS MiB | stack settled after s "
                "| source / target Milvus / broker % core | exact |"),
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                "| ---: | ---: | ---: | --- |"]
        for label, e in catchups:
            c = e["catchup"]
            best = max((x["rows_per_s"] for x in r["cdcs"][label]["catchup"] if x["rows"] == e["rows"]), default=None)
            mark = " (best)" if e["rows_per_s"] == best and args.catchup_passes > 1 else ""
            out.append(f"| {label} | {e['rows']:,} | {e.get('pass', 1)}{mark} | {e['source_insert_s']:.1f} | "
                       f"{e['catchup_s']:.2f} | "
                       f"{fmt(e['first_rows_s'], 2)} | {fmt(e['rows_per_s'])} | {fmt(e['mb_per_s'], 1)} | "
                       f"{fmt(e['ratio_to_bound'], 2)} | {fmt((e.get('write_bound_now') or {}).get('rows_per_s'))} | "
                       f"{fmt(e.get('ratio_to_bound_now'), 2)} | {fmt(e.get('replicate_call_s'), 1)} | "
                       f"{fmt(c['cpu_s'], 1)} | {fmt(c['cpu_pct'])} | {fmt(c['peak_rss_mib'])} | "
                       f"{fmt(e.get('settle_s'), 1)} | {stack_pct_text(e.get('stack_pct'))} | "
                       f"{exact_text(e.get('exact'))} |")
        out += ["", ("/ min(a, b): the rate over the bounds measured at the same size (or the nearest measured). "
                f"b right before: the write bound measured again ({args.adjacent_bound} of its ways, the best counts), "
                "on the same stack just before this pass (after the source insert, while the task was paused); "
                "/ min(a, b before): the rate over that and the read bound: the stack slows as it fills, so both are "
                "shown. "
                "First rows after: resume -> the first count(*) above 0. In ReplicateMessage: seconds the CDC "
                "spent in ReplicateMessage calls with data over the phase, summed over calls made at the same time "
                "(from its own metrics, milvus_cdc_target_call_seconds; the Python CDC only): as long as the phase "
                "or longer means the CDC was waiting for the target all along. Stack settled after: the wait, "
                "after the source insert and before resume, until the stack's processes used under "
                f"{args.settle_pct:g}% of a core together (as before each write-bound pass). Source / target Milvus / "
                "broker: their CPU from resume to the last row counted (in the bounds: from the first request to the "
                "count)."), ""]
    lags = [(label, e) for label, c in r["cdcs"].items() for e in c["lag"]]
    if lags:
        out += [(f"## Live lag (insert returned -> rows counted on the target; {args.lag_batches_per_second:g} "
                "batches a second)"), "",
                ("| CDC | rows/s asked | achieved | seconds | batches x rows | p50 s | p99 s | max s | end lag s "
                "| source's tick p50 / p99 s | after it p50 / p99 s "
                "| early answers (max s) | in ReplicateMessage s | CPU s | CPU % core | peak RSS MiB | exact |"),
                ("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                "| ---: | ---: | --- |")]
        for label, e in lags:
            c = e["cdc"]
            if "exact" in e:
                exact = exact_text(e["exact"])
            else:
                exact = "count " + ("ok" if e["count_at_end"] == e["expected_at_end"] else "WRONG")
            late = str(len(e.get("late", [])))
            if e.get("late_max_s") is not None:
                late += f" ({e['late_max_s']:.2f})"
            out.append(f"| {label} | {e['rate']:,} | {fmt(e['achieved_rows_per_s'])} | {e['seconds']:g} | "
                       f"{e['batches']} x {e['batch']} | {fmt(e['p50_s'], 2)} | {fmt(e['p99_s'], 2)} | "
                       f"{fmt(e['max_s'], 2)} | {fmt(e['end_lag_s'], 2)} | "
                       f"{fmt(e.get('tick_read_p50_s'), 2)} / {fmt(e.get('tick_read_p99_s'), 2)} | "
                       f"{fmt(e.get('after_tick_p50_s'), 3)} / {fmt(e.get('after_tick_p99_s'), 3)} | {late} | "
                       f"{fmt(e.get('replicate_call_s'), 1)} | {fmt(c['cpu_s'], 1)} | {fmt(c['cpu_pct'])} | "
                       f"{fmt(c['peak_rss_mib'])} | {exact} |")
        out += ["", ("A batch's lag ends when a count(*) on the target, waiting for the insert's timestamp "
                "(guarantee_timestamp), answers with every row written up to it. Early answers: batches whose "
                "query answered before count(*) included them (a Milvus 2.3.5 target does this too for writes made "
                "directly with ReplicateMessage, by a few ms); their lag is taken when a count(*) first included "
                "them, and (max s) is the longest such wait. End lag: last insert returned -> count(*) equal to all "
                "rows. Source's tick: insert returned -> a source time tick at or past the insert's timestamp read on "
                "every pchannel by a 5 ms confluent-kafka consumer (no CDC can apply the batch before); after it: "
                "from then until the batch was counted on the target (the CDC's and the target's share)."), ""]
        staged = [(label, e) for label, e in lags if e.get("stages")]
        if staged:
            import milvus_cdc
            stages = [s.value for s in milvus_cdc.Stage]
            out += ["Where the time goes (the CDC's `milvus_cdc_stage_lag_seconds`: how far behind the source's "
                    "clock each stage was when it moved; p50 / p99 read off the histogram's buckets):", "",
                    "| CDC | rows/s | " + " | ".join(stages) + " |",
                    "| --- | ---: | " + " | ".join("---:" for _ in stages) + " |"]
            for label, e in staged:
                shown = [e["stages"].get(stage) for stage in stages]
                out.append(f"| {label} | {e['rate']:,} | " + " | ".join(
                    f"{v['p50']:.2f} / {v['p99']:.2f}" if v else "–" for v in shown) + " |")
            out.append("")
    if r["cdcs"]:
        out += ["## CDC process", "", ("| CDC | RSS at start MiB | idle CPU % core | idle RSS MiB | RSS at end MiB "
                "| ERROR lines in its log |"), "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for label, c in r["cdcs"].items():
            idle = c.get("idle") or {}
            out.append(f"| {label} | {fmt(c.get('rss_start_mib'))} | {fmt(idle.get('cpu_pct'), 1)} | "
                       f"{fmt(idle.get('rss_end_mib'))} | {fmt(c.get('rss_end_mib'))} | {fmt(c.get('log_errors'))} |")
        out += ["", ("CPU: user + system seconds of the CDC process over the phase (% of one core = CPU s / wall s); "
                "peak RSS: its high-water mark over the phase (reset at the start of each phase, and sampled every "
                "0.1 s). A catch-up phase counts from resume to the last row counted."), ""]
    out += ["## Phase durations", "", "| phase | seconds |", "| --- | ---: |"]
    out += [f"| {name} | {seconds:.1f} |" for name, seconds in r["durations"]]
    out += ["", "## Problems seen", ""]
    out += [f"- {p}" for p in r["problems"]] or ["- none"]
    return "\n".join(out) + "\n"


def stack_pct_text(used: dict | None) -> str:
    """Source Milvus / target Milvus / broker, % of a core."""
    if not used:
        return "–"
    return f"{fmt(used.get('source-milvus'))} / {fmt(used.get('target-milvus'))} / {fmt(used.get('kafka'))}"


def exact_text(check: dict | None) -> str:
    if not check:
        return "–"
    text = f"count {check['count']:,}" + (" ok" if check["count_ok"] else f" != {check['expected']:,}")
    if "keys_ok" in check:
        text += ", keys " + ("ok" if check["keys_ok"] else "WRONG")
    return text


# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    run_started = time.monotonic()
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="milvus-cdc-bench-"))
    own_stack = None
    durations: list = []
    reuse = os.environ.get("CDC_TEST_STACK")
    started = time.monotonic()
    if reuse:
        endpoints = json.loads(Path(reuse).read_text())["endpoints"]
        stack_note = f"running stack of {reuse} (etcd, Tansu, source Milvus on Kafka, target Milvus ttMsgEnabled=false)"
    else:
        log("starting a stack (tests/stack.py)")
        own_stack = Stack(workdir / "stack", with_pulsar=False)
        endpoints = own_stack.up()
        stack_note = "started by this run (etcd, Tansu, source Milvus on Kafka, target Milvus ttMsgEnabled=false)"
    durations.append(("stack " + ("reused" if reuse else "start"), time.monotonic() - started))
    bench = None
    code = 0
    pinning = contextlib.nullcontext()
    if args.target_cpus:
        pinning = CorePinning(endpoints.get("pids", {}), args.target_cpus)
        stack_note += "; " + pinning.describe()
        log(pinning.describe())
    try:
        with pinning:
            bench = Bench(args, endpoints, workdir)
            bench.results["durations"] = durations
            found_versions = versions(endpoints["source_milvus"], endpoints["target_milvus"])
            if "bounds" in args.phases:
                for i, rows in enumerate(args.bound_rows):
                    with bench.phase(f"bounds at {rows:,} rows: (a) read, (b) write"):
                        bench.run_bounds(rows, floor=i == 0)
            if "catchup" in args.phases or "lag" in args.phases:
                for label in args.cdcs:
                    (workdir / f"{label}-cdc").mkdir()
                    if label == "python":
                        cdc = PythonCdc(endpoints, workdir / "python-cdc")
                    else:
                        cdc = GoCdc(args.go_cdc, endpoints, workdir / "go-cdc", database=args.go_database)
                    with bench.phase(f"{label} CDC"):
                        bench.run_cdc(cdc)
            bench.results["machine"], bench.results["versions"] = machine, found_versions
    finally:
        if own_stack is not None:
            started = time.monotonic()
            log("stopping the stack")
            own_stack.down()
            durations.append(("stack stop", time.monotonic() - started))
    text = report(bench, args, machine, found_versions, stack_note, time.monotonic() - run_started)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(bench.results, indent=2, default=str))
    code = 1 if bench.results.get("failures") else 0
    if args.keep or code:
        log(f"work directory (logs) kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
