"""maxTaskNum busy tasks on one server, on each meta store (issue 17, item 16): every task follows its own
collection under inserts; creates and lists never answer 503 while the others run, and every copy ends exact.

The figures (creates, list latency, store transactions per second) are printed for the README's table; they are
not asserted: the machines are shared and noisy."""
from __future__ import annotations

import os
import statistics
import threading
import time

import pytest
from pymilvus import DataType, MilvusClient
from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc

from helpers import client, count_of, running_server, wait_until

TASKS = int(os.environ.get("CDC_MANY_TASKS", "4"))  # the suite's (CI time); the README's figures are for 20
ROUNDS, ROWS = 3, 50


def store_writes(server) -> float:
    """Checkpoint transactions the server has made, from its metrics."""
    import urllib.request
    url = server.url.rsplit("/", 1)[0] + "/metrics"
    total = 0.0
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith("milvus_cdc_meta_store_writes_total{") and 'kind="checkpoint"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def load_without_waiting(uri: str, names: list[str]) -> None:
    """LoadCollection over gRPC, which answers at once (pymilvus waits for each load to end)."""
    import grpc
    with grpc.insecure_channel(uri.split("://", 1)[1]) as channel:
        stub = milvus_pb2_grpc.MilvusServiceStub(channel)
        for name in names:
            status = stub.LoadCollection(milvus_pb2.LoadCollectionRequest(collection_name=name), timeout=30)
            assert status.code == 0 and status.error_code == 0, status


class Lister(threading.Thread):
    """Calls list every half second while the tasks run, as a dashboard would."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.stopping = server, threading.Event()
        self.times: list[float] = []
        self.statuses: list[int] = []

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            started = time.monotonic()
            status, _ = self.server.post({"request_type": "list"})
            self.times.append(time.monotonic() - started)
            self.statuses.append(status)


@pytest.mark.parametrize("store", ["sqlite", "mysql", "etcd"])
def test_a_server_holds_max_task_num_busy_tasks(stack, tmp_path, unique_name, store):
    prefix = unique_name(f"many_{store}")
    names = [f"{prefix}_{i}" for i in range(TASKS)]
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    index = MilvusClient.prepare_index_params()
    index.add_index("v", index_type="FLAT", metric_type="L2")
    try:
        run_many(stack, tmp_path, store, names, source, target, schema, index)
    finally:
        for name in names:
            for milvus in (source, target):
                if milvus.has_collection(name):
                    milvus.drop_collection(name)


def run_many(stack, tmp_path, store, names, source, target, schema, index) -> None:
    with running_server(stack, tmp_path, store, maxTaskNum=TASKS) as server:
        lister = Lister(server)
        lister.start()
        started = time.monotonic()
        create_statuses = []
        for name in names:
            status, answer = server.post({"request_type": "create", "request_data": {
                "milvus_connect_param": {"uri": stack["target_milvus"], "token": "root:Milvus",
                                         "connect_timeout": 10},
                "collection_infos": [{"name": name}]}})
            create_statuses.append(status)
            assert status == 200, answer
        created_in = time.monotonic() - started
        for name in names:  # back to back, never waiting for the target
            source.create_collection(name, schema=schema, shards_num=1)
            source.create_index(name, index)
        load_without_waiting(stack["source_milvus"], names)
        writes_before, busy_from = store_writes(server), time.monotonic()
        for round_ in range(ROUNDS):
            for i, name in enumerate(names):
                source.insert(name, [{"id": round_ * ROWS + n, "v": [float(i), float(n), 0.0, 1.0]}
                                     for n in range(ROWS)])
        for name in names:
            wait_until(lambda: count_of(target, name) == ROUNDS * ROWS, 300, 1.0, f"{name} exact on the target")
        busy_for = time.monotonic() - busy_from
        writes_per_second = (store_writes(server) - writes_before) / busy_for
        lister.stopping.set()
        lister.join()
        tasks = server.call("list")["tasks"]
        assert len(tasks) == TASKS and all(t["state"] == "Running" for t in tasks)
        assert 503 not in lister.statuses and set(lister.statuses) == {200}, lister.statuses
        print(f"\n{store}: {TASKS} tasks created in {created_in:.1f}s; list p50 {statistics.median(lister.times):.3f}s "
              f"max {max(lister.times):.3f}s over {len(lister.times)} calls; checkpoint transactions "
              f"{writes_per_second:.1f}/s while {TASKS * ROUNDS * ROWS} rows went through in {busy_for:.1f}s")
        for name in names:
            source.drop_collection(name)
        for name in names:
            wait_until(lambda: not target.has_collection(name), 120, 0.5, f"{name} dropped on the target")
