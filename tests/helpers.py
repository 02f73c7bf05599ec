"""Shared test helpers: a real milvus_cdc.py server process, waiting, and source/target comparison."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import uuid
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import free_ports  # noqa: E402


def hybrid_now() -> int:
    """A Milvus hybrid timestamp for now (what a source would stamp a change made now with)."""
    from pymilvus.client.utils import mkts_from_unixtime
    return mkts_from_unixtime(time.time())


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last failure
            last_error = exc
        time.sleep(interval)
    # str() too: a MilvusException's repr is "MilvusException()", whatever the server said
    said = f"{type(last_error).__name__}: {last_error}" if last_error is not None else "none"
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {said})")


def server_config(stack: dict, workdir: Path, store: str = "sqlite", **overrides) -> dict:
    """A config for a CDC server on a free port, reading the stack's source."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["address"] = f"127.0.0.1:{free_ports(1)[0]}"
    config["logLevel"] = "debug" if os.environ.get("CDC_TEST_DEBUG") else "info"
    meta = config["metaStoreConfig"]
    meta["storeType"] = store
    meta["sqlitePath"] = str(workdir / "meta.db")
    meta["rootPath"] = f"cdc-test-{uuid.uuid4().hex[:12]}"  # stores on shared servers outlive a test session
    if store == "mysql":
        my = stack["mysql"]
        meta["mysqlSourceUrl"] = f"{my['user']}:{my['password']}@tcp({my['host']}:{my['port']})/{my['database']}"
    if store == "etcd":
        meta["etcd"] = {"address": [f"http://{stack['etcd']}"]}
    config["sourceConfig"]["etcd"]["address"] = [f"http://{stack['etcd']}"]
    config["sourceConfig"]["kafka"]["address"] = stack["kafka"]
    config["sourceConfig"]["milvus"] = {"uri": stack["source_milvus"], "token": "root:Milvus"}  # for verify
    config["replication"]["retryTimeout"] = 30
    for dotted, value in overrides.items():
        node = config
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return config


@contextlib.contextmanager
def running_server(stack: dict, workdir: Path, store: str = "sqlite", **overrides):
    """A CDC server for one test; its tasks are deleted and it is stopped afterwards."""
    server = CdcServer(server_config(stack, workdir, store, **overrides), workdir).start()
    try:
        yield server
    finally:
        if server.alive():
            for task in server.call("list")["tasks"]:
                server.call("delete", task_id=task["task_id"])
        server.stop()


class CdcServer:
    """`python milvus_cdc.py -c <config>` as a child process, answering POST /cdc on loopback."""

    def __init__(self, config: dict, workdir: Path):
        self.config, self.workdir = config, workdir
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "server.log"
        self.url = f"http://{config['address']}/cdc"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "CdcServer":
        log = open(self.log_path, "ab")
        if self.proc is None:
            atexit.register(self.kill)  # a failing test must not leave a server replicating into later ones
        # CDC_SERVER_WRAPPER: a profiler to run the server under, e.g. "memray run -o /tmp/cdc.bin" (benchmarks)
        wrapper = os.environ.get("CDC_SERVER_WRAPPER", "").split()
        argv = [sys.executable, *(["-m", *wrapper] if wrapper else []), str(ROOT / "milvus_cdc.py"), "-c",
                str(self.config_path)]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        wait_until(lambda: self.alive() and self.post({"request_type": "list"})[0] == 200, timeout,
                   what=f"the CDC server on {self.url} (log: {self.log_text()[-2000:]})")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    headers = {"Content-Type": "application/json"}  # what every request sends (a test may add a token)

    def raw(self, body: bytes, method: str = "POST", headers: dict | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url, data=body if method not in ("GET", "HEAD") else None,
                                         method=method, headers=headers or self.headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def post(self, body: dict) -> tuple[int, dict]:
        status, raw = self.raw(json.dumps(body).encode())
        return status, json.loads(raw)

    def call(self, request_type: str, **request_data) -> dict:
        """A request that must succeed; returns its data."""
        body = {"request_type": request_type}
        if request_data:
            body["request_data"] = request_data
        status, answer = self.post(body)
        assert status == 200 and answer["code"] == 200, (status, answer)
        return answer.get("data", {})

    def create_task(self, target_uri: str, collections=("*",), **extra) -> str:
        data = {"milvus_connect_param": {"uri": target_uri, "token": "root:Milvus", "connect_timeout": 10},
                "collection_infos": [{"name": n} for n in collections], **extra}
        return self.call("create", **data)["task_id"]

    def task(self, task_id: str) -> dict:
        return self.call("get", task_id=task_id)["Task"]


# ---------------------------------------------------------------------------------------------------------
# Comparing a source collection with its target copy through pymilvus
# ---------------------------------------------------------------------------------------------------------

def client(uri: str, db_name: str = "default"):
    from pymilvus import MilvusClient
    return MilvusClient(uri=uri, db_name=db_name)


def schema_of(milvus, name: str) -> dict:
    described = milvus.describe_collection(name)
    fields = [{k: f.get(k) for k in ("field_id", "name", "type", "params", "is_primary", "auto_id",
                                     "is_partition_key", "element_type")} for f in described["fields"]]
    return {"fields": fields, "num_shards": described["num_shards"], "enable_dynamic_field":
            described["enable_dynamic_field"], "auto_id": described["auto_id"],
            "consistency_level": described["consistency_level"], "properties": described.get("properties"),
            "description": described["description"]}


def indexes_of(milvus, name: str) -> dict:
    found = {}
    for index_name in milvus.list_indexes(name):
        described = milvus.describe_index(name, index_name)
        found[index_name] = {k: v for k, v in described.items()
                             if k not in ("total_rows", "indexed_rows", "pending_index_rows", "state")}
    return found


def load_state_of(milvus, name: str, partition: str | None = None) -> str:
    state = milvus.get_load_state(name, partition_name=partition or "")
    return str(state["state"]).rsplit(".", 1)[-1]


def rows_of(milvus, name: str, fields: list[str], pk: str = "id", partition: str | None = None,
            consistency: str = "Strong") -> list[dict]:
    """Every row, sorted by primary key (duplicates kept, so a caller can see them)."""
    kwargs = {"partition_names": [partition]} if partition else {}
    rows = milvus.query(name, filter="", output_fields=fields, limit=16384, consistency_level=consistency,
                        timeout=30, **kwargs)
    if len(rows) == 16384:  # a query answers at most 16384 rows: page through an iterator
        iterator = milvus.query_iterator(name, batch_size=4096, filter="", output_fields=fields,
                                         consistency_level=consistency, timeout=30, **kwargs)
        rows = []
        while page := iterator.next():
            rows += page
        iterator.close()
    return sorted(rows, key=lambda r: r[pk])


def count_of(milvus, name: str, consistency: str = "Strong") -> int:
    return milvus.query(name, filter="", output_fields=["count(*)"], consistency_level=consistency,
                        timeout=30)[0]["count(*)"]


def assert_same_rows(source, target, name: str, fields: list[str], pk: str = "id", timeout: float = 60.0,
                     partition: str | None = None, consistency: str = "Strong") -> list[dict]:
    """Wait until the target holds exactly the source's rows: same keys, same values, no duplicate key.

    ``consistency`` is the target's: Strong needs the target's ticks to reach its present time, which they do
    while the source is alive; a test replaying old messages reads what is consumed (Eventually)."""
    expected = rows_of(source, name, fields, pk, partition)
    assert len({r[pk] for r in expected}) == len(expected), "the source itself has duplicate keys"

    def same():
        got = rows_of(target, name, fields, pk, partition, consistency)
        return got == expected and (partition is not None or count_of(target, name, consistency) == len(expected))
    try:
        wait_until(same, timeout, what=f"rows of {name} on the target")
    except AssertionError:
        got = rows_of(target, name, fields, pk, partition, consistency)
        keys = [r[pk] for r in got]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        missing = sorted({r[pk] for r in expected} - set(keys))
        extra = sorted(set(keys) - {r[pk] for r in expected})
        counted = count_of(target, name, consistency)
        raise AssertionError(f"{name}: target has {len(got)} rows (count(*) {counted}), source "
                             f"{len(expected)}; duplicated keys {duplicated[:10]}, missing {missing[:10]}, "
                             f"extra {extra[:10]}") from None
    return expected


def stop_and_drop(server: "CdcServer", names: list[str], *sides) -> None:
    """A benchmark's end: its tasks deleted, its server stopped, its collections dropped on every side."""
    for task in server.call("list")["tasks"]:
        server.call("delete", task_id=task["task_id"])
    server.stop()
    for name in names:
        for milvus in sides:
            if milvus.has_collection(name):
                milvus.drop_collection(name)


def append_report(path: str | None, lines: list[str]) -> None:
    if path:
        with open(path, "a") as out:
            out.write("\n".join(lines) + "\n")


def drop_everywhere(source, target, name: str) -> None:
    """Drop a source collection (released first) and wait until its copy is gone from the target."""
    source.release_collection(name)
    source.drop_collection(name)
    wait_until(lambda: not target.has_collection(name), 60, what=f"{name} dropped on the target")


class TcpRelay:
    """A TCP forwarder in front of a real server that a test can cut and restore: a network outage."""

    def __init__(self, upstream: str):
        import socket
        import threading
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.port = free_ports(1)[0]
        self.socket, self.threading = socket, threading
        self.connections: list = []
        self.listener = None
        self.lock = threading.Lock()
        self.restore()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = self.socket.socket()
        listener.setsockopt(self.socket.SOL_SOCKET, self.socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        self.threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            connections, self.connections = self.connections, []
        if listener is not None:
            try:
                listener.shutdown(self.socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in connections:
            try:
                conn.shutdown(self.socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener) -> None:
        while True:
            try:
                downstream, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self.socket.create_connection(self.upstream)
            except OSError:
                downstream.close()
                continue
            with self.lock:
                if self.listener is not listener:
                    downstream.close()
                    upstream.close()
                    return
                self.connections += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                self.threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.close()
                except OSError:
                    pass


# ---------------------------------------------------------------------------------------------------------
# What a Milvus wrote, read under it: index metadata in etcd, operations on the replicate channel
# ---------------------------------------------------------------------------------------------------------

def _pb_fields(data: bytes) -> list[tuple[int, object]]:
    """The (field number, value) pairs of one protobuf message, undecoded: ints for varints, bytes otherwise."""
    def varint(i: int) -> tuple[int, int]:
        shift = value = 0
        while True:
            byte = data[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if not byte & 0x80:
                return value, i
    out, i = [], 0
    while i < len(data):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            size, i = varint(i)
            value, i = data[i:i + size], i + size
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire} not handled")
        out.append((key >> 3, value))
    return out


def _pb_key_values(raw: list[bytes]) -> dict:
    pairs = (dict(_pb_fields(kv)) for kv in raw)
    return {p.get(1, b"").decode(): p.get(2, b"").decode() for p in pairs}


def field_indexes_in_etcd(etcd: str, root_path: str, collection_id: int | None = None,
                          meta_sub_path: str = "meta") -> list[dict]:
    """The index records a Milvus 2.3 keeps in etcd, ``{root}/{meta}/field-index/{collID}/{indexID}``
    (indexcoord ``FieldIndex``): index name, field id, params, ``deleted`` (a dropped index stays until GC).

    ``etcd`` is ``host:port``; ``collection_id`` limits it to one collection."""
    import pyetcd
    host, port = etcd.removeprefix("http://").rsplit(":", 1)
    prefix = f"{root_path}/{meta_sub_path}/field-index/" + (f"{collection_id}/" if collection_id else "")
    conn = pyetcd.client(host=host, port=int(port), timeout=10)
    try:
        found = []
        for value, meta in conn.get_prefix(prefix):
            top = _pb_fields(value)
            info = _pb_fields(next((v for n, v in top if n == 1), b""))
            one = dict(info)
            found.append({
                "key": meta.key.decode(), "collection_id": one.get(1), "field_id": one.get(2),
                "index_name": one.get(3, b"").decode(), "index_id": one.get(4),
                "type_params": _pb_key_values([v for n, v in info if n == 5]),
                "index_params": _pb_key_values([v for n, v in info if n == 6]),
                "user_index_params": _pb_key_values([v for n, v in info if n == 12]),
                "deleted": bool(dict(top).get(2, 0)), "create_time": dict(top).get(3)})
        return sorted(found, key=lambda r: r["key"])
    finally:
        conn.close()


def replicate_channel_ops(kafka: str, topic: str = "by-dev-replicate-msg", collection: str | None = None,
                          types=("CreateIndex", "DropIndex"), timeout: float = 30.0) -> list[dict]:
    """The operations a source wrote on its replicate channel (a Kafka topic), from its beginning to its
    current end, decoded as the milvus_pb2 request each type carries; ``collection`` keeps one collection's."""
    from kafka import KafkaConsumer, TopicPartition
    from pymilvus.grpc_gen import common_pb2, milvus_pb2
    request_of = {name: getattr(milvus_pb2, f"{name}Request") for name in types}
    consumer = KafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False, request_timeout_ms=10000)
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        end = consumer.end_offsets([partition])[partition]
        ops, deadline = [], time.monotonic() + timeout
        while consumer.position(partition) < end and time.monotonic() < deadline:
            for record in consumer.poll(timeout_ms=500).get(partition, []):
                base = common_pb2.MsgHeader.FromString(record.value).base
                kind = common_pb2.MsgType.Name(base.msg_type)
                if kind not in request_of:
                    continue
                request = request_of[kind].FromString(record.value)
                if collection is not None and request.collection_name != collection:
                    continue
                op = {"offset": record.offset, "type": kind, "timestamp": base.timestamp,
                      "db_name": request.db_name, "collection_name": request.collection_name,
                      "field_name": request.field_name, "index_name": request.index_name}
                if kind == "CreateIndex":
                    op["extra_params"] = {p.key: p.value for p in request.extra_params}
                ops.append(op)
        return ops
    finally:
        consumer.close()


def tls_client(uri: str, token: str = "root:Milvus", timeout: float = 10.0, **tls):
    """A pymilvus client over TLS (``server_pem_path`` or ``ca_pem_path``, ``client_pem_path``,
    ``client_key_path``, ``server_name``), on a connection of its own: pymilvus otherwise reuses any open
    connection with the same uri and token, whatever its certificates. Close it with ``.close()``."""
    from pymilvus import MilvusClient
    return MilvusClient(uri=uri, token=token, timeout=timeout, alias=f"tls-{uuid.uuid4().hex}", **tls)
