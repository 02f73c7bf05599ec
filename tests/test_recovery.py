"""Pause and resume, a server restart and a kill -9, each under a continuous insert load: afterwards the target
holds exactly the source's rows, none lost and none twice (count(*) counts duplicated keys; query does not)."""
from __future__ import annotations

import random
import threading
import time
import urllib.request

import pytest
from pymilvus import DataType, MilvusClient

from helpers import CdcServer, assert_same_rows, client, running_server, server_config, wait_until


class InsertLoad:
    """Inserts (and now and then deletes) on the source from a thread until stopped."""

    def __init__(self, uri: str, name: str, batch: int = 200, pause: float = 0.02):
        self.milvus, self.name, self.batch, self.pause = client(uri), name, batch, pause
        self.stopping = threading.Event()
        self.next_id = 0
        self.errors: list[Exception] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        rng = random.Random(1)
        while not self.stopping.is_set():
            start = self.next_id
            try:
                self.milvus.insert(self.name, [{"id": i, "s": f"v{i}", "v": [rng.random() for _ in range(4)]}
                                               for i in range(start, start + self.batch)])
                self.next_id += self.batch
                if rng.random() < 0.2:
                    self.milvus.delete(self.name, ids=[rng.randrange(0, self.next_id) for _ in range(20)])
            except Exception as exc:  # noqa: BLE001 - reported by stop()
                self.errors.append(exc)
            time.sleep(self.pause)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stopping.set()
        self.thread.join(30)
        assert not self.errors, self.errors[:3]


def loaded_collection(stack, name: str, shards: int = 2) -> tuple:
    source = client(stack["source_milvus"])
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("s", DataType.VARCHAR, max_length=32)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    source.create_collection(name, schema=schema, shards_num=shards)
    params = source.prepare_index_params()
    params.add_index("v", index_type="FLAT", metric_type="L2")
    source.create_index(name, params)
    source.load_collection(name)
    return source, client(stack["target_milvus"])


@pytest.fixture
def cdc(stack, tmp_path, request):
    """A fresh server and `*` task per test (one task per target at a time), with a slow checkpoint so that a
    restart has much sent-but-unconfirmed data to replay; a test may add config keys (indirect parameter)."""
    settings = {"replication.checkpointInterval": 2.0, **getattr(request, "param", {})}
    server = CdcServer(server_config(stack, tmp_path, **settings), tmp_path).start()
    task_id = server.create_task(stack["target_milvus"])
    yield server, task_id
    if server.alive():
        server.call("delete", task_id=task_id)
    server.stop()


def finish(stack, source, target, name, server, task_id):
    wait_until(lambda: target.has_collection(name) and
               str(target.get_load_state(name)["state"]).endswith("Loaded"), 90, what="the copy loaded")
    rows = assert_same_rows(source, target, name, ["id", "s", "v"], timeout=120)
    assert server.task(task_id)["state"] == "Running"
    source.release_collection(name)
    source.drop_collection(name)
    wait_until(lambda: not target.has_collection(name), 60, what="the copy dropped")
    return rows


def test_pause_and_resume_mid_stream(stack, cdc, unique_name):
    server, task_id = cdc
    name = unique_name("pause")
    source, target = loaded_collection(stack, name)
    with InsertLoad(stack["source_milvus"], name) as load:
        time.sleep(3)
        server.call("pause", task_id=task_id)
        assert server.task(task_id)["state"] == "Paused"
        time.sleep(3)
        server.call("resume", task_id=task_id)
        time.sleep(3)
    rows = finish(stack, source, target, name, server, task_id)
    assert load.next_id > 2000 and len(rows) > 1000


def test_stop_and_start_the_server_mid_stream(stack, cdc, unique_name):
    server, task_id = cdc
    name = unique_name("restart")
    source, target = loaded_collection(stack, name)
    with InsertLoad(stack["source_milvus"], name):
        time.sleep(3)
        server.stop()
        time.sleep(3)
        server.start()
        assert server.task(task_id)["state"] == "Running"
        time.sleep(3)
    finish(stack, source, target, name, server, task_id)


@pytest.mark.parametrize("cdc", [{}, {"replication.callsPerChannel": 4}], indirect=True,
                         ids=["one-call-per-channel", "four-calls-per-channel"])
def test_kill_9_during_continuous_inserts(stack, cdc, unique_name):
    """With several calls per channel, inserts and deletes of one channel overlap in calls and a kill lands while
    several are out: the replay must still leave every row once."""
    server, task_id = cdc
    name = unique_name("kill")
    source, target = loaded_collection(stack, name, shards=4)
    rng = random.Random(9)
    with InsertLoad(stack["source_milvus"], name, batch=300, pause=0.01):
        time.sleep(2)
        for _ in range(3):
            time.sleep(rng.uniform(1.0, 3.0))
            server.kill()
            time.sleep(rng.uniform(0.5, 2.0))
            server.start()
        time.sleep(3)
    rows = finish(stack, source, target, name, server, task_id)
    assert len(rows) > 5000


def test_checkpoints_are_written_in_batches_not_per_message(stack, tmp_path, unique_name):
    """With an etcd meta store, the version of the task's position key counts its writes: a task that keeps up
    writes at most one per move of its order's watermark, which only a source time tick moves (five a second),
    plus the start and the final one, however many messages went through. (That a busy task writes once per
    checkpointInterval is test_applier's.)"""
    import pyetcd
    from prometheus_client.parser import text_string_to_metric_families
    config = server_config(stack, tmp_path, store="etcd", **{"replication.checkpointInterval": 0.5})
    server = CdcServer(config, tmp_path).start()
    try:
        started = time.monotonic()
        task_id = server.create_task(stack["target_milvus"])
        name = unique_name("batched")
        source, target = loaded_collection(stack, name)
        with InsertLoad(stack["source_milvus"], name) as load:
            time.sleep(5)
        with urllib.request.urlopen(server.url.removesuffix("/cdc") + "/metrics", timeout=10) as answer:
            read = sum(s.value for family in text_string_to_metric_families(answer.read().decode())
                       for s in family.samples if s.name == "milvus_cdc_messages_read_total")
        server.stop()
        elapsed = time.monotonic() - started
        host, port = stack["etcd"].split(":")
        _, meta = pyetcd.client(host=host, port=int(port)).get(
            f"{config['metaStoreConfig']['rootPath']}/task_position/{task_id}")
        assert 2 <= meta.version <= elapsed * 5 + 5, (meta.version, elapsed)
        assert meta.version < read / 2, f"{meta.version} checkpoint writes for {read} messages read"
        assert load.next_id > 0
        server.start()
        finish(stack, source, target, name, server, task_id)
        server.call("delete", task_id=task_id)
    finally:
        server.stop()


@pytest.mark.parametrize("stopped_by", ["pause", "kill -9"])
def test_collections_dropped_while_the_task_is_stopped_are_dropped_on_the_target(stack, tmp_path, unique_name,
                                                                                 stopped_by):
    """A task naming only these collections reads no channel of theirs once they are gone, so their drops must
    come from the catalog (issue 17, item 2)."""
    names = [unique_name("gone") for _ in range(3)]
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    with running_server(stack, tmp_path) as server:
        task_id = server.create_task(stack["target_milvus"], collections=names)
        for name in names:  # not loaded: a release before the drop would name them on the replicate channel
            schema = MilvusClient.create_schema(auto_id=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
            source.create_collection(name, schema=schema, shards_num=1)
            source.insert(name, [{"id": i, "v": [i / 7] * 4} for i in range(10)])
        wait_until(lambda: all(target.has_collection(n) for n in names), 60, what="the copies on the target")
        if stopped_by == "pause":
            server.call("pause", task_id=task_id)
        else:
            server.kill()
        for name in names:
            source.drop_collection(name)
        if stopped_by == "pause":
            server.call("resume", task_id=task_id)
        else:
            server.start()
        wait_until(lambda: not any(target.has_collection(n) for n in names), 60, what="the copies dropped")
        assert server.task(task_id)["state"] == "Running"
