"""What a task replicates and how it behaves: named collections, where a new task starts (and the replay
option), and failures of the target (retried, then a pause with the reason, then a resume that loses nothing)."""
from __future__ import annotations

import time

import pytest
from pymilvus import DataType, MilvusClient

from helpers import (CdcServer, TcpRelay, assert_same_rows, client, drop_everywhere, running_server,
                     server_config, wait_until)


@pytest.fixture
def server(stack, tmp_path):
    with running_server(stack, tmp_path, **{"replication.retryTimeout": 8, "replication.retryMaxBackoff": 1}) as s:
        yield s


def make_collection(milvus, name: str, shards: int = 1, load: bool = True) -> None:
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("s", DataType.VARCHAR, max_length=32)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    milvus.create_collection(name, schema=schema, shards_num=shards)
    if load:
        params = milvus.prepare_index_params()
        params.add_index("v", index_type="FLAT", metric_type="L2")
        milvus.create_index(name, params)
        milvus.load_collection(name)


def rows(start: int, count: int) -> list[dict]:
    return [{"id": i, "s": f"r{i}", "v": [i / 7] * 4} for i in range(start, start + count)]


def wait_loaded(target, name: str) -> None:
    wait_until(lambda: target.has_collection(name) and
               str(target.get_load_state(name)["state"]).endswith("Loaded"), 90, what=f"{name} loaded on target")


def test_named_collections_are_the_only_ones_replicated(stack, server, unique_name):
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    db = unique_name("nameddb")
    source.create_database(db)
    source_db = client(stack["source_milvus"], db)
    named, in_db, other = unique_name("named"), unique_name("indb"), unique_name("other")
    make_collection(source, named)
    task_id = server.create_task(stack["target_milvus"], collections=[named, f"{db}.{in_db}"])
    make_collection(source_db, in_db, shards=2)
    make_collection(source, other)
    for milvus, name in ((source, named), (source_db, in_db), (source, other)):
        milvus.insert(name, rows(0, 100))
    wait_until(lambda: db in target.list_databases(), 60, what=f"database {db} on the target")
    target_db = client(stack["target_milvus"], db)
    wait_loaded(target_db, in_db)
    assert_same_rows(source_db, target_db, in_db, ["id", "s", "v"])
    # The collection named in the task existed before it: it comes over as it is, indexed and loaded.
    wait_loaded(target, named)
    assert [i for i in target.list_indexes(named)] == ["v"]
    assert not target.has_collection(other), "a collection the task does not name was replicated"
    assert [c["name"] for c in server.task(task_id)["collection_infos"]] == [named, f"{db}.{in_db}"]
    drop_everywhere(source_db, target_db, in_db)
    source.release_collection(named)
    source.drop_collection(named)
    wait_until(lambda: not target.has_collection(named), 60, what="the named collection dropped")
    source.release_collection(other)
    source.drop_collection(other)
    source.drop_database(db)
    assert not target.has_collection(other)


def test_a_new_task_starts_at_the_latest_position_unless_asked_to_replay(stack, server, unique_name):
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    latest, replayed = unique_name("latest"), unique_name("replay")
    for name in (latest, replayed):
        make_collection(source, name, shards=2)
        source.insert(name, rows(0, 100))

    # By default (as the Go CDC) old rows are not copied; the collection comes over indexed and loaded.
    task_id = server.create_task(stack["target_milvus"], collections=[latest])
    source.insert(latest, rows(1000, 50))
    wait_loaded(target, latest)
    copied = target.query(latest, filter="", output_fields=["id"], limit=1000, consistency_level="Strong",
                          timeout=30)
    wait_until(lambda: sorted(r["id"] for r in target.query(
        latest, filter="", output_fields=["id"], limit=1000, consistency_level="Strong", timeout=30)) ==
        list(range(1000, 1050)), 60, what="only the rows written after the task started")
    server.call("delete", task_id=task_id)

    # replay_existing: the collection is replayed from its start position, index and load included.
    task_id = server.create_task(stack["target_milvus"], collections=[replayed], replay_existing=True)
    assert server.task(task_id)["replay_existing"] is True
    source.insert(replayed, rows(1000, 50))
    wait_loaded(target, replayed)
    got = assert_same_rows(source, target, replayed, ["id", "s", "v"])
    assert len(got) == 150 and len(copied) <= 50
    drop_everywhere(source, target, replayed)
    server.call("delete", task_id=task_id)
    source.release_collection(latest)
    source.drop_collection(latest)


def test_target_outage_is_retried_then_pauses_the_task_with_the_reason(stack, server, unique_name):
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    relay = TcpRelay(stack["target_milvus"])
    name = unique_name("outage")
    task_id = server.create_task(relay.uri, collections=[name])
    make_collection(source, name, shards=2)
    source.insert(name, rows(0, 100))
    wait_loaded(target, name)
    assert_same_rows(source, target, name, ["id", "s", "v"])

    relay.cut()  # shorter than retryTimeout (8 s): retried, the task keeps running
    source.insert(name, rows(100, 100))
    time.sleep(3)
    relay.restore()
    assert_same_rows(source, target, name, ["id", "s", "v"])
    assert server.task(task_id)["state"] == "Running"

    relay.cut()  # longer than retryTimeout: the task pauses and says why
    source.insert(name, rows(200, 100))
    source.delete(name, ids=[0, 1, 2])
    task = wait_until(lambda: (t := server.task(task_id))["state"] == "Paused" and t, 60, what="the pause")
    assert "target" in task["reason"] and ("replicate" in task["reason"] or "describe" in task["reason"]), \
        task["reason"]
    assert "UNAVAILABLE" in task["reason"] or "unavailable" in task["reason"].lower(), task["reason"]
    relay.restore()
    server.call("resume", task_id=task_id)
    assert_same_rows(source, target, name, ["id", "s", "v"], timeout=90)
    assert server.task(task_id)["state"] == "Running"
    drop_everywhere(source, target, name)
    relay.cut()


def drop_on_target(uri: str, name: str) -> None:
    """Drop a collection made by hand on the target: as a replica, or the target retries a denied write forever."""
    import grpc
    from pymilvus.grpc_gen import common_pb2, milvus_pb2, milvus_pb2_grpc
    stub = milvus_pb2_grpc.MilvusServiceStub(grpc.insecure_channel(uri.removeprefix("http://")))
    base = common_pb2.MsgBase(msg_type=common_pb2.DropCollection, replicateInfo=common_pb2.ReplicateInfo(
        isReplicate=True, msgTimestamp=int(time.time() * 1000) << 18))
    status = stub.DropCollection(milvus_pb2.DropCollectionRequest(base=base, collection_name=name), timeout=30)
    assert status.code == 0, status


def test_a_refusal_nothing_explains_pauses_the_task_at_once_with_the_reason(stack, server, unique_name):
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    name = unique_name("handmade")
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=8)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=16)
    target.create_collection(name, schema=schema)  # made by hand on the target before the task
    try:
        task_id = server.create_task(stack["target_milvus"], collections=[name])
        make_collection(source, name, load=False)  # the same name, another schema
        started = time.monotonic()
        task = wait_until(lambda: (t := server.task(task_id))["state"] == "Paused" and t, 30, interval=0.2,
                          what="the pause")
        assert time.monotonic() - started < 30
        reason = task["reason"]
        assert f"create collection default.{name}" in reason, reason  # the operation and the object
        assert "create duplicate collection with different parameters" in reason, reason  # the target's answer
        assert target.describe_collection(name)["fields"][0]["name"] == "key", "the target's own was left alone"
    finally:
        drop_on_target(stack["target_milvus"], name)
        source.drop_collection(name)


@pytest.fixture
def patient_server(stack, tmp_path):
    with running_server(stack, tmp_path, **{"replication.retryTimeout": 300, "replication.retryMaxBackoff": 2}) as s:
        yield s


def test_a_target_down_for_a_minute_is_retried_and_the_task_recovers_by_itself(stack, patient_server, unique_name):
    server = patient_server
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    relay = TcpRelay(stack["target_milvus"])
    name = unique_name("down60")
    task_id = server.create_task(relay.uri, collections=[name])
    make_collection(source, name, shards=2)
    source.insert(name, rows(0, 100))
    wait_loaded(target, name)
    assert_same_rows(source, target, name, ["id", "s", "v"])

    relay.cut()
    cut_at = time.monotonic()
    source.insert(name, rows(100, 200))
    source.delete(name, ids=[3, 4, 150])
    source.create_partition(name, "during")
    source.insert(name, rows(1000, 50), partition_name="during")
    retrying = wait_until(lambda: server.task(task_id).get("retrying"), 30, what="get to show the retried call")[0]
    assert retrying["operation"] and retrying["since"] and retrying["tries"] >= 1 and retrying["last_error"]
    while time.monotonic() - cut_at < 60:
        task = server.task(task_id)
        assert task["state"] == "Running", task.get("reason")
        time.sleep(2)
    later = server.task(task_id)["retrying"][0]
    assert later["tries"] > retrying["tries"] and later["since"] <= retrying["since"] or \
        later["operation"] != retrying["operation"]
    relay.restore()
    assert_same_rows(source, target, name, ["id", "s", "v"], timeout=90)
    task = server.task(task_id)
    assert task["state"] == "Running" and "retrying" not in task
    drop_everywhere(source, target, name)
    relay.cut()


def test_a_task_that_cannot_start_is_an_error_not_a_200(stack, tmp_path):
    """The source's etcd does not answer: the task cannot pin its start positions, create says why, and nothing of
    the task is kept."""
    from stack import free_ports
    config = server_config(stack, tmp_path, **{"replication.retryTimeout": 2, "replication.retryMaxBackoff": 0.5})
    config["sourceConfig"]["etcd"]["address"] = [f"http://127.0.0.1:{free_ports(1)[0]}"]
    server = CdcServer(config, tmp_path).start()
    try:
        status, answer = server.post({"request_type": "create", "request_data": {
            "milvus_connect_param": {"uri": stack["target_milvus"], "connect_timeout": 5},
            "collection_infos": [{"name": "*"}]}})
        assert status == 500 and answer["code"] == 500, answer
        assert "could not start" in answer["message"] and "etcd" in answer["message"], answer
        assert server.call("list")["tasks"] == []
    finally:
        server.stop()


def test_a_deleted_task_leaves_no_checkpoint_behind(stack, tmp_path, unique_name):
    """Delete stops the task's threads before its rows go: no late checkpoint write brings them back."""
    import pyetcd
    config = server_config(stack, tmp_path, store="etcd", **{"replication.checkpointInterval": 0.05})
    server = CdcServer(config, tmp_path).start()
    host, port = stack["etcd"].split(":")
    store = pyetcd.client(host=host, port=int(port))
    prefix = config["metaStoreConfig"]["rootPath"]
    try:
        source = client(stack["source_milvus"])
        name = unique_name("orphan")
        make_collection(source, name, shards=2)
        for round_ in range(3):
            task_id = server.create_task(stack["target_milvus"], collections=[name])
            for start in range(0, 600, 200):
                source.insert(name, rows(round_ * 1000 + start, 200))
            server.call("delete", task_id=task_id)
            time.sleep(1)
            assert store.get(f"{prefix}/task_position/{task_id}")[0] is None
            assert store.get(f"{prefix}/task_info/{task_id}")[0] is None
        source.release_collection(name)
        source.drop_collection(name)
    finally:
        server.stop()
        store.close()

