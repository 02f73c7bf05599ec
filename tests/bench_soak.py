"""Benchmark: an hour of live replication with DDL churn (issue 20, item 3). Is the CDC flat over time?

    CDC_TEST_STACK=/tmp/milvus-cdc-stack/current.json python tests/bench_soak.py \\
        [--minutes 60] [--rate 5000] [--window 10] [--out FILE.md]

One task (`*`, sqlite store) on a source that holds nothing else at the start. For --minutes:
- rows go into one collection (2 shards, dim 16, loaded) at --rate rows/s, in 10 batches a second;
- once a second, the lag of the latest batch: insert returned -> a count(*) on the target, waiting for the
  insert's timestamp (guarantee_timestamp), counts every row written so far (polled when 2.3.5 answers early);
- once a minute, a churn collection goes through a life fired back to back, never waiting for the target:
  created, indexed, loaded, written, a partition made and written, released, its index dropped and made again,
  loaded again, released, the partition dropped, the collection dropped;
- every 10 s, the CDC process's RSS, threads, open sockets and CPU.
Per --window minutes the report gives lag p50 / p99 / max and the process figures at the window's end. At the
end: the target's count(*) of the main collection against the rows written, every churn copy gone from the
target, and the task running with nothing to retry. The exit status is 1 only when that end check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymilvus import DataType, MilvusClient  # noqa: E402

from bench_cdcs import RowWriter, count_rows, metrics_text, milvus_stub, stage_lags  # noqa: E402
from bench_idle_tasks import cpu_seconds, sockets, status  # noqa: E402
from bench_replication import pct, stage_means  # noqa: E402
from helpers import CdcServer, append_report, client, server_config, wait_until  # noqa: E402

DIM = 16


class Soak:
    def __init__(self, args, stack: dict):
        self.args, self.stack = args, stack
        self.source = client(stack["source_milvus"])
        self.target = client(stack["target_milvus"])
        self.suffix = str(int(time.time()))
        self.main = f"soak_main_{self.suffix}"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.lags: list[tuple[float, float]] = []          # (seconds since start, lag)
        self.samples: list[tuple[float, dict]] = []        # (seconds since start, process figures)
        self.churns: list[tuple[float, str, float]] = []   # (seconds since start, name, seconds the life took)
        self.problems: list[str] = []
        self.written = 0          # rows in the main collection
        self.last_ts = 0
        self.started = 0.0

    def problem(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] PROBLEM: {text}", file=sys.stderr, flush=True)
        with self.lock:
            self.problems.append(text)

    def make_main(self) -> None:
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("label", DataType.VARCHAR, max_length=64)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=DIM)
        self.source.create_collection(self.main, schema=schema, shards_num=2)
        index = MilvusClient.prepare_index_params()
        index.add_index("v", index_type="FLAT", metric_type="L2")
        self.source.create_index(self.main, index)
        self.source.load_collection(self.main)

    # -- the threads ----------------------------------------------------------------------------------------

    def insert(self) -> None:
        writer = RowWriter(self.stack["source_milvus"], self.main, DIM, seed=3)
        batch = max(1, self.args.rate // 10)
        vectors = writer.random_vectors(batch)
        k = 0
        try:
            while not self.stop.is_set():
                delay = self.started + k * 0.1 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                ts = writer.insert(writer.request(self.written, batch, vectors))
                with self.lock:
                    self.written += batch
                    self.last_ts = ts
                    self.last_returned = time.monotonic()
                k += 1
        except Exception as exc:  # noqa: BLE001
            self.problem(f"inserting: {exc}")
            self.stop.set()
        finally:
            writer.close()

    def measure_lag(self) -> None:
        _, stub = milvus_stub(self.stack["target_milvus"])
        while not self.stop.wait(1.0):
            with self.lock:
                ts, expected, returned = self.last_ts, self.written, getattr(self, "last_returned", 0.0)
            if not ts:
                continue
            try:
                counted = count_rows(stub, self.main, guarantee_ts=ts, timeout=300)
                while counted < expected and not self.stop.is_set():
                    time.sleep(0.005)
                    counted = count_rows(stub, self.main)
                with self.lock:
                    self.lags.append((returned - self.started, time.monotonic() - returned))
            except Exception as exc:  # noqa: BLE001
                self.problem(f"lag query: {exc}")

    def churn(self) -> None:
        k = 0
        while not self.stop.is_set():
            began = time.monotonic()
            name = f"soak_churn_{self.suffix}_{k}"
            try:
                self.one_life(name)
                with self.lock:
                    self.churns.append((began - self.started, name, time.monotonic() - began))
            except Exception as exc:  # noqa: BLE001
                self.problem(f"churn {name}: {exc}")
            k += 1
            self.stop.wait(max(0.0, 60.0 - (time.monotonic() - began)))

    def one_life(self, name: str) -> None:
        s = self.source
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=DIM)
        s.create_collection(name, schema=schema, shards_num=1)
        index = MilvusClient.prepare_index_params()
        index.add_index("v", index_type="FLAT", metric_type="L2")
        s.create_index(name, index)
        s.load_collection(name)
        rows = [{"id": i, "v": [float(i % 7)] * DIM} for i in range(1000)]
        s.insert(name, rows)
        s.create_partition(name, "p1")
        s.insert(name, [{"id": 10_000 + i, "v": [1.0] * DIM} for i in range(100)], partition_name="p1")
        s.release_collection(name)
        s.drop_index(name, "v")
        index = MilvusClient.prepare_index_params()
        index.add_index("v", index_type="IVF_FLAT", metric_type="L2", params={"nlist": 8})
        s.create_index(name, index)
        s.load_collection(name)
        s.delete(name, filter="id < 100")
        s.release_collection(name)
        s.drop_partition(name, "p1")
        s.drop_collection(name)

    def sample(self, server: CdcServer) -> None:
        pid = server.proc.pid

        def scrape() -> dict | None:
            return stage_lags(metrics_text(server))
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        while not self.stop.wait(10.0):
            cpu1, t1, stages1 = cpu_seconds(pid), time.monotonic(), scrape()
            figures = {"rss_mib": status(pid, "VmRSS") / 1024, "threads": status(pid, "Threads"),
                       "sockets": sockets(pid), "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
                       "stages": stages1}
            cpu0, t0 = cpu1, t1
            with self.lock:
                self.samples.append((t1 - self.started, figures))

    # -- the run --------------------------------------------------------------------------------------------

    def run(self) -> list[str]:
        others = [n for n in self.source.list_collections()]
        if others:
            raise RuntimeError(f"the source holds collections {others[:10]}: the `*` task would replicate them")
        self.make_main()
        workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
        server = CdcServer(server_config(self.stack, workdir), workdir).start()
        task_id = server.create_task(self.stack["target_milvus"])
        lines: list[str] = []
        try:
            wait_until(lambda: self.target.has_collection(self.main) and
                       str(self.target.get_load_state(self.main)["state"]).endswith("Loaded"), 300,
                       what="the main collection's copy loaded")
            self.started = time.monotonic()
            threads = [threading.Thread(target=f, daemon=True) for f in (self.insert, self.measure_lag, self.churn)]
            threads.append(threading.Thread(target=self.sample, args=(server,), daemon=True))
            for thread in threads:
                thread.start()
            deadline = self.started + self.args.minutes * 60
            while time.monotonic() < deadline and not self.stop.is_set():
                time.sleep(5)
                if not server.alive():
                    self.problem("the CDC server died")
                    break
            self.stop.set()
            for thread in threads:
                thread.join(120)
            lines = self.report(server, task_id)
        finally:
            server.stop()
            for side in (self.source, self.target):
                for name in side.list_collections():
                    if name.startswith(f"soak_main_{self.suffix}") or name.startswith(f"soak_churn_{self.suffix}"):
                        side.drop_collection(name)
        return lines

    def report(self, server: CdcServer, task_id: str) -> list[str]:
        args = self.args
        end = {}
        try:
            counted = count_rows(milvus_stub(self.stack["target_milvus"])[1], self.main, guarantee_ts=self.last_ts,
                                 timeout=300)
            wait_until(lambda: count_rows(milvus_stub(self.stack["target_milvus"])[1], self.main) >= self.written,
                       30, what="every row counted")
            counted = count_rows(milvus_stub(self.stack["target_milvus"])[1], self.main)
            end["count"] = (counted, self.written)
            wait_until(lambda: not [n for n in self.target.list_collections() if n.startswith("soak_churn_")], 120,
                       what="every churn copy dropped on the target")
        except Exception as exc:  # noqa: BLE001
            self.problem(f"end check: {exc}")
        task = server.task(task_id)
        lines = [f"Soak, {args.minutes:g} min at {args.rate:,} rows/s with a churn collection a minute "
                 f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}):", "",
                 "| minutes | lag p50 s | lag p99 s | lag max s | RSS MiB | threads | sockets | CPU % core | churns "
                 "| tick read / acknowledged / ticked, p50 behind the source s |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        previous: dict | None = None
        window = args.window * 60
        for start in range(0, int(args.minutes * 60), int(window)):
            lags = [lag for at, lag in self.lags if start <= at < start + window]
            figures = [f for at, f in self.samples if start <= at < start + window]
            churns = [c for c in self.churns if start <= c[0] < start + window]
            if not lags or not figures:
                continue
            last = figures[-1]
            cpu = statistics.fmean(f["cpu_pct"] for f in figures)
            stages = stage_means(previous, last["stages"]) if previous else {}
            previous = last["stages"]
            staged = " / ".join(f"{stages[s]['p50']:.2f}" if s in stages else "–"
                                for s in ("tick_read", "acknowledged", "ticked"))
            lines.append(f"| {start / 60:g}-{(start + window) / 60:g} | {pct(lags, 50):.2f} | {pct(lags, 99):.2f} | "
                         f"{max(lags):.2f} | {last['rss_mib']:.0f} | {last['threads']} | {last['sockets']} | "
                         f"{cpu:.0f} | {len(churns)} | {staged} |")
        if self.samples:
            first, last = self.samples[0][1], self.samples[-1][1]
            lines += ["", f"RSS {first['rss_mib']:.0f} -> {last['rss_mib']:.0f} MiB "
                      f"({100 * (last['rss_mib'] / first['rss_mib'] - 1):+.1f}%), threads {first['threads']} -> "
                      f"{last['threads']}, sockets {first['sockets']} -> {last['sockets']} (first and last sample)"]
        lines.append(f"End: count(*) {end.get('count')}; task {task.get('state')}"
                     f"{'; retrying ' + json.dumps(task.get('retrying')) if task.get('retrying') else ''}; "
                     f"churn lives {len(self.churns)}; problems: {self.problems or 'none'}")
        if end.get("count") is None or end["count"][0] != end["count"][1] or task.get("state") != "Running":
            self.problems.append("end check failed")
        return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--window", type=float, default=10, help="minutes per line of the report")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    stack = json.loads(Path(os.environ["CDC_TEST_STACK"]).read_text())["endpoints"]
    soak = Soak(args, stack)
    try:
        lines = soak.run()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    print("\n".join(lines))
    append_report(args.out, lines)
    return 1 if "end check failed" in soak.problems else 0


if __name__ == "__main__":
    sys.exit(main())
