"""What tests/bench_replication.py measures with: the CDC servers under test behind one interface, a meter of a
process's CPU and memory, and a fast writer of rows to the source.

Not a test module (pytest collects only test_*.py). Nothing here edits milvus_cdc.py; the Python CDC runs as
`python milvus_cdc.py -c config.yaml` through tests/helpers.py's CdcServer, the Go CDC as its own binary.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import gzip
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import CdcServer, hybrid_now, server_config, wait_until  # noqa: F401 - hybrid_now for the benches
from stack import free_ports

try:
    import numpy
except ImportError:  # plain lists then: slower to build, same rows
    numpy = None

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------------
# CPU and memory of a process, per phase
# ---------------------------------------------------------------------------------------------------------

class ProcessMeter:
    """CPU seconds (user + system, of the process and its reaped children) and resident memory of one pid.

    A phase is a ``window()``: its CPU is the difference of two readings; its peak RSS is the kernel's high-water
    mark (VmHWM) after resetting it at the start (``/proc/PID/clear_refs`` = 5), cross-checked by sampling every
    0.1 s (the sampled peak is used when the reset is not allowed)."""

    def __init__(self, pid: int):
        self.pid = pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        return (utime + stime + cutime + cstime) / CLK_TCK

    def status_kib(self) -> dict[str, int]:
        found = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
        return found

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def window(self) -> MeterWindow:
        return MeterWindow(self)


class MeterWindow:
    def __init__(self, meter: ProcessMeter):
        self.meter = meter
        self.reset = meter.reset_peak()
        self.cpu0, self.wall0 = meter.cpu_seconds(), time.monotonic()
        self.sampled_peak = meter.status_kib().get("VmRSS", 0)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.result: dict | None = None

    def _sample(self) -> None:
        while not self.done.wait(0.1):
            with contextlib.suppress(OSError):
                self.sampled_peak = max(self.sampled_peak, self.meter.status_kib().get("VmRSS", 0))

    def stop(self) -> dict:
        if self.result is not None:
            return self.result
        self.done.set()
        self.thread.join()
        try:
            cpu = self.meter.cpu_seconds() - self.cpu0
            status = self.meter.status_kib()
        except OSError:  # the process is gone
            cpu, status = float("nan"), {}
        wall = time.monotonic() - self.wall0
        peak_kib = max(self.sampled_peak, status.get("VmHWM", 0) if self.reset else 0)
        self.result = {"wall_s": wall, "cpu_s": cpu, "cpu_pct": 100.0 * cpu / wall if wall > 0 else 0.0,
                       "peak_rss_mib": peak_kib / 1024, "rss_end_mib": status.get("VmRSS", 0) / 1024}
        return self.result


class StackMeter:
    """CPU of the stack's own processes (by the pids its state records): where the cores went during a phase,
    and whether the stack is quiet enough to measure the next one."""

    PARTS = ("source-milvus", "target-milvus", "kafka", "etcd")

    def __init__(self, pids: dict[str, int]):
        self.meters = {name: ProcessMeter(pids[name]) for name in self.PARTS if name in pids}

    def cpu_seconds(self) -> dict[str, float]:
        found = {}
        for name, meter in self.meters.items():
            with contextlib.suppress(OSError):
                found[name] = meter.cpu_seconds()
        return found

    def start(self) -> tuple[dict[str, float], float]:
        return self.cpu_seconds(), time.monotonic()

    def since(self, started: tuple[dict[str, float], float]) -> dict[str, float]:
        """% of one core per part since ``start()``, and their sum as "stack"."""
        before, wall0 = started
        now, wall = self.cpu_seconds(), max(time.monotonic() - wall0, 1e-6)
        used = {name: 100.0 * (now[name] - before[name]) / wall for name in now if name in before}
        used["stack"] = sum(used.values())
        return used

    def settle(self, below_pct: float, window: float, timeout: float) -> tuple[float, dict[str, float]]:
        """Wait until the stack uses less than ``below_pct`` of a core over ``window`` seconds: the seconds
        waited and the last window's use (over the limit when ``timeout`` ran out)."""
        started = time.monotonic()
        while True:
            mark = self.start()
            time.sleep(window)
            used = self.since(mark)
            if used["stack"] < below_pct or time.monotonic() - started > timeout:
                return time.monotonic() - started, used


class CorePinning:
    """The target Milvus on CPUs of its own, everything else (source Milvus, brokers, etcd, this script and the
    CDCs it starts, which inherit its CPUs) on the rest: what a target on its own machine looks like, on one box.

    Every thread of each process is pinned (a thread's mask is its own; threads made later inherit their maker's),
    and put back on all the CPUs it had at the end, so a reused stack is left as found."""

    def __init__(self, pids: dict[str, int], target_cpus: int):
        self.pids = dict(pids)
        self.all = sorted(os.sched_getaffinity(0))
        if not 0 < target_cpus < len(self.all):
            raise ValueError(f"cannot give the target {target_cpus} of {len(self.all)} CPUs and keep one for the rest")
        if "target-milvus" not in self.pids:
            raise ValueError("the stack's state names no target-milvus process to pin")
        self.target = set(self.all[-target_cpus:])
        self.rest = set(self.all) - self.target

    def describe(self) -> str:
        return (f"target Milvus pinned to CPU {','.join(map(str, sorted(self.target)))}; source Milvus, broker, "
                f"etcd, the CDC and this script to CPU {','.join(map(str, sorted(self.rest)))}")

    @staticmethod
    def _pin(pid: int, cpus: set[int]) -> None:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):  # a thread that ended meanwhile
                    os.sched_setaffinity(int(tid), cpus)

    def __enter__(self) -> CorePinning:
        for name, pid in self.pids.items():
            self._pin(pid, self.target if name == "target-milvus" else self.rest)
        self._pin(os.getpid(), self.rest)
        return self

    def __exit__(self, *exc) -> None:
        for pid in [*self.pids.values(), os.getpid()]:
            self._pin(pid, set(self.all))


# ---------------------------------------------------------------------------------------------------------
# Rows to the source, fast: Insert requests built from numpy blocks and sent over the raw gRPC stub
# ---------------------------------------------------------------------------------------------------------

def grpc_address(uri: str) -> str:
    return uri.split("://", 1)[-1].rstrip("/")


def milvus_stub(uri: str):
    """A MilvusService stub on a channel of its own (no pymilvus client state, thread-safe, no size limits)."""
    import grpc
    from pymilvus.grpc_gen import milvus_pb2_grpc
    channel = grpc.insecure_channel(grpc_address(uri), options=[
        ("grpc.max_send_message_length", 512 * MIB), ("grpc.max_receive_message_length", 512 * MIB)])
    return channel, milvus_pb2_grpc.MilvusServiceStub(channel)


def check_status(status, what: str) -> None:
    if status.code != 0 or status.error_code != 0:
        raise RuntimeError(f"{what}: code {status.code or status.error_code}: {status.reason}")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class RowWriter:
    """Inserts rows ``{"id": i, "label": "row-i", "v": <dim random floats>}`` into one source collection.

    The float vector column goes in as one packed protobuf field parsed from numpy bytes (no per-float Python
    work), so the client keeps up with 20k rows/s on a busy 2-core machine; ``vectors`` lets a caller reuse a
    random block across batches (ids always differ)."""

    def __init__(self, uri: str, name: str, dim: int, seed: int = 0):
        self.channel, self.stub = milvus_stub(uri)
        self.name, self.dim = name, dim
        self.rng = numpy.random.default_rng(seed) if numpy is not None else random.Random(seed)

    def close(self) -> None:
        self.channel.close()

    def random_vectors(self, count: int):
        """A block of ``count`` x dim float32 vectors, as a FloatArray message."""
        from pymilvus.grpc_gen import schema_pb2
        if numpy is not None:
            raw = self.rng.random((count, self.dim), dtype=numpy.float32).astype("<f4", copy=False).tobytes()
        else:
            raw = struct.pack(f"<{count * self.dim}f", *(self.rng.random() for _ in range(count * self.dim)))
        return schema_pb2.FloatArray.FromString(b"\x0a" + _varint(len(raw)) + raw)

    def request(self, first_id: int, count: int, vectors=None):
        from pymilvus.grpc_gen import milvus_pb2, schema_pb2
        request = milvus_pb2.InsertRequest(collection_name=self.name, num_rows=count)
        ids = request.fields_data.add(type=schema_pb2.DataType.Int64, field_name="id")
        ids.scalars.long_data.data.extend(range(first_id, first_id + count))
        labels = request.fields_data.add(type=schema_pb2.DataType.VarChar, field_name="label")
        labels.scalars.string_data.data.extend([f"row-{i}" for i in range(first_id, first_id + count)])
        vector = request.fields_data.add(type=schema_pb2.DataType.FloatVector, field_name="v")
        vector.vectors.dim = self.dim
        vector.vectors.float_vector.CopyFrom(vectors if vectors is not None else self.random_vectors(count))
        return request

    def insert(self, request) -> int:
        """Send one Insert; returns the source write's hybrid timestamp."""
        answer = self.stub.Insert(request, timeout=120)
        check_status(answer.status, f"insert into {self.name}")
        if answer.insert_cnt != request.num_rows:
            raise RuntimeError(f"insert into {self.name}: {answer.insert_cnt} of {request.num_rows} rows taken")
        return answer.timestamp

    def insert_rows(self, first_id: int, count: int, batch: int = 10_000) -> tuple[int, float]:
        """Insert ids first_id .. first_id+count-1 in batches; returns (last write's timestamp, seconds)."""
        started, ts = time.monotonic(), 0
        for start in range(first_id, first_id + count, batch):
            ts = self.insert(self.request(start, min(batch, first_id + count - start)))
        return ts, time.monotonic() - started


def count_rows(stub, name: str, guarantee_ts: int | None = None, timeout: float = 120.0) -> int:
    """count(*) of a collection: with ``guarantee_ts`` (a source write's timestamp) the query waits until the
    collection is consumed up to it (Customized consistency), without it it reads what is consumed now."""
    from pymilvus.grpc_gen import common_pb2, milvus_pb2
    request = milvus_pb2.QueryRequest(collection_name=name, expr="", output_fields=["count(*)"],
                                      use_default_consistency=False)
    if guarantee_ts is None:
        request.consistency_level = common_pb2.ConsistencyLevel.Eventually
        request.guarantee_timestamp = 1
    else:
        request.consistency_level = common_pb2.ConsistencyLevel.Customized
        request.guarantee_timestamp = guarantee_ts
    answer = stub.Query(request, timeout=timeout)
    check_status(answer.status, f"count(*) of {name}")
    return answer.fields_data[0].scalars.long_data.data[0]


def keys_exact(client, name: str, first_id: int, count: int) -> tuple[bool, str]:
    """Every primary key of the collection read back: exactly ids first_id .. first_id+count-1, each once."""
    import logging
    logging.getLogger("pymilvus.orm.iterator").setLevel(logging.ERROR)  # "failed to get mvccTs" on 2.3.5
    iterator = client.query_iterator(name, batch_size=16384, filter="", output_fields=["id"],
                                     consistency_level="Eventually", timeout=120)
    keys: list[int] = []
    try:
        while page := iterator.next():
            keys.extend(r["id"] for r in page)
    finally:
        iterator.close()
    if numpy is not None:
        array = numpy.asarray(keys, dtype=numpy.int64)
        distinct = int(numpy.unique(array).size)
        inside = int(((array >= first_id) & (array < first_id + count)).sum())
    else:
        distinct = len(set(keys))
        inside = sum(first_id <= k < first_id + count for k in keys)
    ok = len(keys) == count and distinct == count and inside == count
    return ok, f"{len(keys)} keys read, {distinct} distinct, {inside} in range (expected {count})"


# ---------------------------------------------------------------------------------------------------------
# The CDC servers under test
# ---------------------------------------------------------------------------------------------------------

def metrics_text(server: CdcServer) -> str | None:
    """The server's /metrics, or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{server.config['address']}/metrics", timeout=10) as answer:
            return answer.read().decode()
    except OSError:
        return None


def stage_lags(text: str | None) -> dict[str, dict[str, float]] | None:
    """milvus_cdc_stage_lag_seconds in a /metrics text: per stage, its samples (``sum``, ``count``, and ``le=B``
    per bucket)."""
    from prometheus_client.parser import text_string_to_metric_families
    if text is None:
        return None
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "milvus_cdc_stage_lag_seconds":
            continue
        for sample in family.samples:
            values = found.setdefault(sample.labels["stage"], {})
            kind = sample.name.rsplit("_", 1)[1]
            values[f"le={sample.labels['le']}" if kind == "bucket" else kind] = sample.value
    return found


class CdcUnderTest:
    """One CDC server process with the task API both CDCs share (create `*`, pause, resume, get, delete)."""

    label = "?"

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def pid(self) -> int: ...
    def call(self, request_type: str, **data) -> dict: ...
    def create_task(self) -> str: ...
    def state(self, task_id: str) -> str: ...
    def version(self) -> str: ...
    def log_tail(self, chars: int = 3000) -> str: ...

    def replicate_call_seconds(self) -> float | None:
        """Seconds the CDC has spent in ReplicateMessage calls so far, when it tells (its metrics)."""
        return None

    def stage_lags(self) -> dict[str, dict[str, float]] | None:
        """Stage -> its histogram's samples so far (seconds behind the source), when the CDC tells (its metrics)."""
        return None

    def pause(self, task_id: str) -> None:
        self.call("pause", task_id=task_id)
        wait_until(lambda: self.state(task_id) == "Paused", 60, interval=0.2, what=f"{self.label} task paused")

    def resume(self, task_id: str) -> None:
        self.call("resume", task_id=task_id)

    def delete(self, task_id: str) -> None:
        self.call("delete", task_id=task_id)


class PythonCdc(CdcUnderTest):
    """milvus_cdc.py through tests/helpers.py's CdcServer (sqlite meta store in its work directory)."""

    label = "python"

    def __init__(self, endpoints: dict, workdir: Path):
        self.endpoints = endpoints
        self.workdir = workdir
        # CDC_BENCH_SET="replication.writeAhead=1,sourceConfig.readChanLen=2": config keys to try (YAML values)
        settings = dict(item.split("=", 1) for item in os.environ.get("CDC_BENCH_SET", "").split(",") if item)
        self.server = CdcServer(server_config(endpoints, workdir, **{k: yaml.safe_load(v) for k, v in
                                                                     settings.items()}), workdir)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def pid(self) -> int:
        return self.server.proc.pid

    def call(self, request_type: str, **data) -> dict:
        return self.server.call(request_type, **data)

    def create_task(self) -> str:
        return self.server.create_task(self.endpoints["target_milvus"], collections=["*"])

    def state(self, task_id: str) -> str:
        return self.server.task(task_id)["state"]

    def version(self) -> str:
        import milvus_cdc
        root = Path(milvus_cdc.__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "milvus_cdc.py"],
                               capture_output=True, text=True, check=False).stdout.strip()
        import hashlib
        digest = hashlib.sha256(Path(milvus_cdc.__file__).read_bytes()).hexdigest()[:12]
        return (f"milvus_cdc.py {milvus_cdc.__version__} (git {commit or '?'}"
                f"{', file modified' if dirty else ''}; sha256 {digest})")

    def log_tail(self, chars: int = 3000) -> str:
        return self.server.log_text()[-chars:]

    def _metrics(self) -> str | None:
        return metrics_text(self.server)

    def replicate_call_seconds(self) -> float | None:
        """milvus_cdc_target_call_seconds_sum{operation="ReplicateMessage"}: the applier's data writes (the
        ticker's ticks are not counted there)."""
        if (text := self._metrics()) is None:
            return None
        for line in text.splitlines():
            if line.startswith("milvus_cdc_target_call_seconds_sum{") and 'operation="ReplicateMessage"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stage_lags(self) -> dict[str, dict[str, float]] | None:
        return stage_lags(self._metrics())


def confluent_librdkafka() -> Path:
    """The librdkafka inside the confluent-kafka wheel (the one that talks to Tansu)."""
    import confluent_kafka
    found = sorted(glob.glob(str(Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs" /
                                 "librdkafka*.so.1")))
    if not found:
        raise RuntimeError("no librdkafka*.so.1 in the confluent-kafka wheel (confluent_kafka.libs)")
    return Path(found[0])


class GoCdc(CdcUnderTest):
    """The Go milvus-cdc binary (v1.0.0, see /work/shared/gocdc/README.md), in a work directory of its own.

    It reads ./configs/cdc.yaml from its working directory; librdkafka comes from the confluent-kafka wheel
    (first on LD_LIBRARY_PATH); its meta store is MariaDB database ``database`` under a root path of its own,
    whose rows are deleted at the end. Its tasks accept only ``*`` (v1.0.0 refuses named collections)."""

    label = "go"

    def __init__(self, binary: str, endpoints: dict, workdir: Path, database: str = "gocdc"):
        self.endpoints, self.workdir, self.database = endpoints, workdir, database
        self.binary = self._unpacked(Path(binary))
        self.root_path = f"cdc-bench-{uuid.uuid4().hex[:10]}"
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}/cdc"
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "go-cdc.log"

    def _unpacked(self, path: Path) -> Path:
        if path.suffix != ".gz":
            return path
        binary = self.workdir / "cdc-go"
        with gzip.open(path) as packed, open(binary, "wb") as out:
            shutil.copyfileobj(packed, out)
        binary.chmod(0o755)
        return binary

    def _mysql(self):
        import pymysql
        my = self.endpoints.get("mysql") or {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
        return pymysql.connect(host=my["host"], port=int(my["port"]), user=my["user"], password=my["password"],
                               connect_timeout=5, autocommit=True)

    def start(self) -> None:
        my = self.endpoints.get("mysql") or {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
        conn = self._mysql()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
        finally:
            conn.close()
        libdir = self.workdir / "lib"
        libdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(confluent_librdkafka(), libdir / "librdkafka.so.1")
        (self.workdir / "configs").mkdir(parents=True, exist_ok=True)
        config = {
            "address": f"127.0.0.1:{self.port}", "maxTaskNum": 100, "maxNameLength": 256,
            "metaStoreConfig": {"storeType": "mysql", "rootPath": self.root_path, "mysqlSourceUrl":
                                f"{my['user']}:{my['password']}@tcp({my['host']}:{my['port']})/{self.database}"
                                "?charset=utf8"},
            "sourceConfig": {"etcdAddress": [self.endpoints["etcd"]], "etcdRootPath": "by-dev",
                             "etcdMetaSubPath": "meta", "readChanLen": 10, "defaultPartitionName": "_default",
                             "kafka": {"address": self.endpoints["kafka"]}}}
        (self.workdir / "configs" / "cdc.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
            p for p in (str(libdir), os.environ.get("LD_LIBRARY_PATH", "")) if p)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(self.binary)], cwd=self.workdir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        atexit.register(self.kill)  # a benchmark that dies must not leave it replicating into the target

        def answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Go CDC exited with {self.proc.returncode}: {self.log_tail()}")
            return self._post({"request_type": "list"}).get("code") == 200
        wait_until(answers, 60, interval=0.5, what=f"the Go CDC on {self.url}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            conn = self._mysql()
            try:
                with conn.cursor() as cur:
                    for table in ("task_info", "task_position"):
                        cur.execute(f"DELETE FROM `{self.database}`.`{table}` WHERE `{table}_key` LIKE %s",
                                    (self.root_path + "/%",))
            finally:
                conn.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pid(self) -> int:
        return self.proc.pid

    def _post(self, body: dict) -> dict:
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read() or b"{}")
        except urllib.error.URLError:
            return {}

    def call(self, request_type: str, **data) -> dict:
        body = {"request_type": request_type, **({"request_data": data} if data else {})}
        answer = self._post(body)
        if answer.get("code") != 200:
            raise RuntimeError(f"Go CDC {request_type}: {answer}")
        return answer.get("data") or {}

    def create_task(self) -> str:
        host, port = grpc_address(self.endpoints["target_milvus"]).rsplit(":", 1)
        return self.call("create", milvus_connect_param={
            "host": host, "port": int(port), "username": "root", "password": "Milvus", "enable_tls": False,
            "connect_timeout": 10}, collection_infos=[{"name": "*"}],
            rpc_channel_info={"name": "by-dev-replicate-msg"})["task_id"]

    def state(self, task_id: str) -> str:
        return self.call("get", task_id=task_id)["task"]["state"]

    def version(self) -> str:
        commit = ""
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if "GitCommit=" in line:
                    commit = line.split("GitCommit=", 1)[1].split("]", 1)[0]
                    break
        release = {"6459edf": "v1.0.0"}.get(commit[:7], "")
        return f"Go milvus-cdc {release or self.binary.name} (git {commit or '?'})"

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""
