"""Replication end to end: every operation of the seed, from the real source to the real target, through a real
milvus_cdc.py server with one task for every collection (``*``)."""
from __future__ import annotations

import random
import time
from types import SimpleNamespace

import grpc
import pytest
from pymilvus import DataType, MilvusClient
from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc

import milvus_cdc as m
from helpers import (CdcServer, assert_same_rows, client, indexes_of, load_state_of, schema_of,
                     server_config, wait_until)

ALL_SCALARS = ["id", "b", "i8", "i16", "i32", "f", "d", "s", "j"]


@pytest.fixture(scope="module")
def cdc(stack, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("replication")
    server = CdcServer(server_config(stack, workdir), workdir).start()
    task_id = server.create_task(stack["target_milvus"])
    yield SimpleNamespace(server=server, task_id=task_id, source=client(stack["source_milvus"]),
                          target=client(stack["target_milvus"]), stack=stack)
    server.call("delete", task_id=task_id)
    server.stop()


@pytest.fixture(autouse=True)
def task_keeps_running(cdc):
    yield
    task = cdc.server.task(cdc.task_id)
    assert task["state"] == "Running", f"the task stopped: {task.get('reason')}\n{cdc.server.log_text()[-3000:]}"


def full_schema(vector: str = "float", dynamic: bool = True, auto_id: bool = False):
    schema = MilvusClient.create_schema(auto_id=auto_id, enable_dynamic_field=dynamic, description="every type")
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("b", DataType.BOOL)
    schema.add_field("i8", DataType.INT8)
    schema.add_field("i16", DataType.INT16)
    schema.add_field("i32", DataType.INT32)
    schema.add_field("f", DataType.FLOAT)
    schema.add_field("d", DataType.DOUBLE)
    schema.add_field("s", DataType.VARCHAR, max_length=128)
    schema.add_field("j", DataType.JSON)
    if vector == "float":
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=8)
    else:
        schema.add_field("v", DataType.BINARY_VECTOR, dim=16)
    return schema


def make_rows(start: int, count: int, vector: str = "float", dynamic: bool = True) -> list[dict]:
    rng = random.Random(start)
    rows = []
    for i in range(start, start + count):
        row = {"id": i, "b": i % 2 == 0, "i8": i % 127, "i16": i % 30000, "i32": i * 7, "f": i / 4,
               "d": i / 3, "s": f"row-{i}", "j": {"n": i, "tags": [i % 3, "x"]},
               "v": [rng.random() for _ in range(8)] if vector == "float" else bytes(rng.randrange(256)
                                                                                      for _ in range(2))}
        if dynamic:
            row["extra"] = f"dyn-{i}"
        rows.append(row)
    return rows


def index_and_load(milvus, name: str, vector: str = "float") -> None:
    params = milvus.prepare_index_params()
    if vector == "float":
        params.add_index("v", index_type="FLAT", metric_type="L2")
    else:
        params.add_index("v", index_type="BIN_FLAT", metric_type="HAMMING")
    milvus.create_index(name, params)
    milvus.load_collection(name)


def wait_collection(target, name: str, present: bool = True, timeout: float = 60):
    wait_until(lambda: target.has_collection(name) == present, timeout,
               what=f"collection {name} to be {'created' if present else 'dropped'} on the target")


def wait_loaded(target, name: str, partition: str | None = None, state: str = "Loaded", timeout: float = 90):
    wait_until(lambda: load_state_of(target, name, partition) == state, timeout,
               what=f"{name}{'/' + partition if partition else ''} to be {state} on the target")


# ---------------------------------------------------------------------------------------------------------
# Collections and databases
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vector", ["float", "binary"])
def test_create_collection_copies_the_schema(cdc, unique_name, vector):
    name = unique_name("schema")
    cdc.source.create_collection(name, schema=full_schema(vector), shards_num=3, consistency_level="Bounded",
                                 properties={"collection.ttl.seconds": "86400"})
    wait_collection(cdc.target, name)
    source, target = schema_of(cdc.source, name), schema_of(cdc.target, name)
    assert target == source
    assert target["num_shards"] == 3 and target["enable_dynamic_field"] is True
    assert {f["name"] for f in target["fields"]} >= set(ALL_SCALARS + ["v"])
    created = [c.describe_collection(name)["created_timestamp"] for c in (cdc.source, cdc.target)]
    assert created[0] == created[1], "the target's copy keeps the source's creation time"
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


def test_auto_id_and_varchar_primary_key(cdc, unique_name):
    name = unique_name("autoid")
    schema = MilvusClient.create_schema(auto_id=True)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=36)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    cdc.source.create_collection(name, schema=schema, consistency_level="Strong")
    index_and_load(cdc.source, name)
    cdc.source.insert(name, [{"v": [float(i)] * 4} for i in range(50)])
    wait_loaded(cdc.target, name)
    assert schema_of(cdc.target, name) == schema_of(cdc.source, name)
    assert_same_rows(cdc.source, cdc.target, name, ["pk", "v"], pk="pk")
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


def test_drop_collection(cdc, unique_name):
    name = unique_name("drop")
    cdc.source.create_collection(name, schema=full_schema(), shards_num=2)
    cdc.source.insert(name, make_rows(0, 20))
    wait_collection(cdc.target, name)
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


def test_create_and_drop_database_with_a_collection_in_it(cdc, unique_name):
    db = unique_name("db")
    cdc.source.create_database(db)
    wait_until(lambda: db in cdc.target.list_databases(), 60, what=f"database {db} on the target")
    source_db, target_db = client(cdc.stack["source_milvus"], db), client(cdc.stack["target_milvus"], db)
    name = unique_name("indb")
    source_db.create_collection(name, schema=full_schema(), shards_num=1)
    index_and_load(source_db, name)
    source_db.insert(name, make_rows(0, 30))
    source_db.delete(name, ids=[5, 6])
    wait_loaded(target_db, name)
    assert schema_of(target_db, name) == schema_of(source_db, name)
    assert_same_rows(source_db, target_db, name, ALL_SCALARS + ["v", "extra"])
    assert not cdc.target.has_collection(name), "the copy lives in its database, not in default"
    source_db.release_collection(name)
    source_db.drop_collection(name)
    wait_collection(target_db, name, present=False)
    cdc.source.drop_database(db)
    wait_until(lambda: db not in cdc.target.list_databases(), 60, what=f"database {db} dropped on the target")


def test_drop_and_recreate_with_the_same_name_ends_as_the_new_one(cdc, unique_name):
    name = unique_name("again")
    cdc.source.create_collection(name, schema=full_schema(), shards_num=2)
    cdc.source.insert(name, make_rows(0, 40))
    cdc.source.drop_collection(name)
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("label", DataType.VARCHAR, max_length=16)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    source = cdc.source
    source._get_connection().schema_cache.pop(name, None)  # pymilvus keeps the old incarnation's schema
    source.create_collection(name, schema=schema, shards_num=1)
    index_and_load(source, name)
    source.insert(name, [{"id": i, "label": f"new{i}", "v": [1.0] * 4} for i in range(1000, 1010)])

    def recreated():
        return cdc.target.has_collection(name) and \
            cdc.target.describe_collection(name)["created_timestamp"] == \
            cdc.source.describe_collection(name)["created_timestamp"]
    wait_until(recreated, 60, what="the new incarnation on the target")
    target = cdc.target
    wait_loaded(target, name)
    assert schema_of(target, name) == schema_of(source, name)
    rows = assert_same_rows(source, target, name, ["id", "label"])
    assert [r["id"] for r in rows] == list(range(1000, 1010))
    source.release_collection(name)
    source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


# ---------------------------------------------------------------------------------------------------------
# Partitions and data
# ---------------------------------------------------------------------------------------------------------

def test_create_and_drop_partition(cdc, unique_name):
    name = unique_name("part")
    cdc.source.create_collection(name, schema=full_schema(), shards_num=2)
    cdc.source.create_partition(name, "empty_one")
    cdc.source.create_partition(name, "with_rows")
    cdc.source.insert(name, make_rows(0, 10), partition_name="with_rows")
    wait_until(lambda: cdc.target.has_collection(name) and
               set(cdc.target.list_partitions(name)) == {"_default", "empty_one", "with_rows"}, 60,
               what="both partitions on the target")
    cdc.source.drop_partition(name, "empty_one")
    cdc.source.drop_partition(name, "with_rows")
    wait_until(lambda: cdc.target.list_partitions(name) == ["_default"], 60, what="partitions dropped")
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


@pytest.mark.parametrize("vector", ["float", "binary"])
def test_insert_and_delete_in_default_and_named_partitions(cdc, unique_name, vector):
    name = unique_name("data")
    cdc.source.create_collection(name, schema=full_schema(vector), shards_num=2)
    cdc.source.create_partition(name, "p1")
    index_and_load(cdc.source, name, vector)
    cdc.source.insert(name, make_rows(0, 300, vector))
    cdc.source.insert(name, make_rows(1000, 200, vector), partition_name="p1")
    cdc.source.delete(name, ids=list(range(0, 300, 7)))
    cdc.source.delete(name, ids=[1000, 1001, 1199], partition_name="p1")
    cdc.source.insert(name, make_rows(5000, 5, vector))
    wait_loaded(cdc.target, name)
    fields = ALL_SCALARS + ["v", "extra"]
    rows = assert_same_rows(cdc.source, cdc.target, name, fields)
    assert len(rows) == 300 - 43 + 200 - 3 + 5
    assert_same_rows(cdc.source, cdc.target, name, ["id", "s"], partition="p1")
    cdc.source.release_collection(name)
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


# ---------------------------------------------------------------------------------------------------------
# Indexes, load, release, flush
# ---------------------------------------------------------------------------------------------------------

def test_create_and_drop_index(cdc, unique_name):
    name = unique_name("index")
    cdc.source.create_collection(name, schema=full_schema(), shards_num=1)
    params = cdc.source.prepare_index_params()
    params.add_index("v", index_type="IVF_FLAT", metric_type="IP", index_name="v_ivf", params={"nlist": 32})
    params.add_index("s", index_type="Trie", index_name="s_trie")
    cdc.source.create_index(name, params)
    wait_until(lambda: cdc.target.has_collection(name) and
               indexes_of(cdc.target, name) == indexes_of(cdc.source, name), 60, what="indexes on the target")
    assert indexes_of(cdc.target, name)["v_ivf"]["nlist"] == "32"
    cdc.source.drop_index(name, "s_trie")
    wait_until(lambda: list(indexes_of(cdc.target, name)) == ["v_ivf"], 60, what="index dropped on the target")
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


def test_load_and_release_collection(cdc, unique_name):
    name = unique_name("load")
    cdc.source.create_collection(name, schema=full_schema(), shards_num=2)
    index_and_load(cdc.source, name)
    wait_loaded(cdc.target, name)
    cdc.source.release_collection(name)
    wait_loaded(cdc.target, name, state="NotLoad")
    cdc.source.load_collection(name)
    wait_loaded(cdc.target, name)
    cdc.source.release_collection(name)
    wait_loaded(cdc.target, name, state="NotLoad")
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


def test_load_and_release_partitions(cdc, unique_name):
    name = unique_name("loadpart")
    cdc.source.create_collection(name, schema=full_schema(), shards_num=1)
    for partition in ("p1", "p2", "p3"):
        cdc.source.create_partition(name, partition)
    params = cdc.source.prepare_index_params()
    params.add_index("v", index_type="FLAT", metric_type="L2")
    cdc.source.create_index(name, params)
    cdc.source.load_partitions(name, ["p1", "p2"])
    wait_collection(cdc.target, name)
    wait_loaded(cdc.target, name, "p1")
    wait_loaded(cdc.target, name, "p2")
    assert load_state_of(cdc.target, name, "p3") == "NotLoad"
    cdc.source.release_partitions(name, ["p2"])
    wait_loaded(cdc.target, name, "p2", state="NotLoad")
    assert load_state_of(cdc.target, name, "p1") == "Loaded"
    cdc.source.release_partitions(name, ["p1"])
    wait_loaded(cdc.target, name, "p1", state="NotLoad")
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


def persistent_segments(uri: str, name: str) -> list:
    stub = milvus_pb2_grpc.MilvusServiceStub(grpc.insecure_channel(uri.removeprefix("http://")))
    answer = stub.GetPersistentSegmentInfo(milvus_pb2.GetPersistentSegmentInfoRequest(collectionName=name))
    return list(answer.infos)


def test_flush(cdc, unique_name):
    name = unique_name("flush")
    cdc.source.create_collection(name, schema=full_schema(), shards_num=1)
    cdc.source.insert(name, make_rows(0, 100))
    wait_collection(cdc.target, name)
    time.sleep(2)
    assert persistent_segments(cdc.stack["target_milvus"], name) == [], "nothing is sealed before the flush"
    cdc.source.flush(name)
    wait_until(lambda: sum(s.num_rows for s in persistent_segments(cdc.stack["target_milvus"], name)) == 100,
               90, what="the flushed segment on the target")
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


# ---------------------------------------------------------------------------------------------------------
# Back to back: what users' scripts do, with no wait for the target between two source calls
# ---------------------------------------------------------------------------------------------------------

def test_release_then_drop_a_partition_back_to_back(cdc, unique_name):
    """The target refuses to drop a loaded partition; the source's history says it was released first."""
    name = unique_name("b2bpart")
    source = cdc.source
    source.create_collection(name, schema=full_schema(), shards_num=2)
    index_and_load(source, name)
    source.create_partition(name, "p")
    source.insert(name, make_rows(0, 30), partition_name="p")
    source.release_partitions(name, ["p"])
    source.drop_partition(name, "p")
    source.insert(name, make_rows(100, 10))
    wait_until(lambda: cdc.target.has_collection(name) and cdc.target.list_partitions(name) == ["_default"], 60,
               what="the partition dropped on the target")
    wait_loaded(cdc.target, name)
    assert_same_rows(source, cdc.target, name, ["id", "s"])
    source.release_collection(name)
    source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


def test_drop_a_loaded_collection_then_its_database_back_to_back(cdc, unique_name):
    """The target refuses to drop a database that is not empty; the collection's drop comes first."""
    db, name = unique_name("b2bdb"), unique_name("b2bcoll")
    cdc.source.create_database(db)
    source_db = client(cdc.stack["source_milvus"], db)
    source_db.create_collection(name, schema=full_schema(), shards_num=2)
    index_and_load(source_db, name)
    source_db.insert(name, make_rows(0, 20))
    source_db.drop_collection(name)  # loaded: Milvus 2.3 drops it without a release
    cdc.source.drop_database(db)
    wait_until(lambda: db not in cdc.target.list_databases(), 60, what=f"database {db} dropped on the target")


def test_the_model_based_sequence_of_seed_1097918520_back_to_back(cdc, unique_name):
    """Issue 17, item 15, as the model-based test drew it: one name in two databases; the database's collection
    indexed, loaded and dropped, then its database, all back to back. The loaded collection's drop may carry a
    later timestamp than the database's drop: the database still goes, and the other database's copy too."""
    db, name = unique_name("seeddb"), unique_name("seedc")
    cdc.source.create_collection(name, schema=full_schema(), shards_num=1)  # default.<name>
    cdc.source.create_database(db)
    source_db = client(cdc.stack["source_milvus"], db)
    source_db.create_collection(name, schema=full_schema(), shards_num=2)
    cdc.source.drop_collection(name)
    index_and_load(source_db, name)
    source_db.drop_collection(name)
    cdc.source.drop_database(db)
    wait_until(lambda: db not in cdc.target.list_databases(), 60, what=f"database {db} dropped on the target")
    wait_collection(cdc.target, name, present=False)


def test_drop_and_recreate_the_same_name_back_to_back(cdc, unique_name):
    """The new incarnation may reach the target while the old one is there: the old one is dropped first."""
    name = unique_name("b2bagain")
    source = cdc.source
    for round_ in range(3):
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field(f"label{round_}", DataType.VARCHAR, max_length=16)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=4 + round_)
        source._get_connection().schema_cache.pop(name, None)  # pymilvus keeps the old incarnation's schema
        if round_:
            source.drop_collection(name)
        source.create_collection(name, schema=schema, shards_num=1 + round_ % 2)
        source.insert(name, [{"id": i, f"label{round_}": f"r{round_}-{i}", "v": [1.0] * (4 + round_)}
                             for i in range(round_ * 100, round_ * 100 + 10)])
    index_and_load(source, name)

    def recreated():
        return cdc.target.has_collection(name) and \
            cdc.target.describe_collection(name)["created_timestamp"] == \
            source.describe_collection(name)["created_timestamp"]
    wait_until(recreated, 60, what="the last incarnation on the target")
    wait_loaded(cdc.target, name)
    assert schema_of(cdc.target, name) == schema_of(source, name)
    rows = assert_same_rows(source, cdc.target, name, ["id", "label2"])
    assert [r["id"] for r in rows] == list(range(200, 210))
    source.release_collection(name)
    source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


def test_create_insert_and_flush_back_to_back(cdc, unique_name):
    """The target flushes a channel only once it watches it, which takes a first tick."""
    name = unique_name("b2bflush")
    cdc.source.create_collection(name, schema=full_schema(), shards_num=2)
    cdc.source.insert(name, make_rows(0, 100))
    cdc.source.flush(name)
    wait_until(lambda: cdc.target.has_collection(name) and
               sum(s.num_rows for s in persistent_segments(cdc.stack["target_milvus"], name)) == 100,
               90, what="the flushed segments on the target")
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


# ---------------------------------------------------------------------------------------------------------
# Everything at once, and what the API shows about it
# ---------------------------------------------------------------------------------------------------------

def test_mixed_workload_across_databases_and_shared_channels(cdc, unique_name):
    """Two databases, six collections whose shards share pchannels, interleaved DML and DDL."""
    dbs = [unique_name("mixdb"), unique_name("mixdb")]
    for db in dbs:
        cdc.source.create_database(db)
    sources = {db: client(cdc.stack["source_milvus"], db) for db in dbs}
    wait_until(lambda: set(dbs) <= set(cdc.target.list_databases()), 60, what="both databases on the target")
    targets = {db: client(cdc.stack["target_milvus"], db) for db in dbs}
    names = {db: [unique_name("mix") for _ in range(3)] for db in dbs}
    for db in dbs:
        for i, name in enumerate(names[db]):
            sources[db].create_collection(name, schema=full_schema(), shards_num=[1, 4, 8][i])
            index_and_load(sources[db], name)
    rng = random.Random(7)
    next_id = {(db, n): 0 for db in dbs for n in names[db]}
    for round_ in range(12):
        for db in dbs:
            for name in names[db]:
                start = next_id[(db, name)]
                sources[db].insert(name, make_rows(start, rng.randrange(5, 60)))
                next_id[(db, name)] = start + 60
                if round_ % 3 == 2:
                    sources[db].delete(name, ids=[rng.randrange(0, start + 1) for _ in range(10)])
        if round_ == 4:
            sources[dbs[0]].create_partition(names[dbs[0]][1], "late")
            sources[dbs[0]].insert(names[dbs[0]][1], make_rows(90000, 25), partition_name="late")
        if round_ == 7:
            dropped = names[dbs[1]].pop()
            sources[dbs[1]].release_collection(dropped)
            sources[dbs[1]].drop_collection(dropped)
    wait_collection(targets[dbs[1]], dropped, present=False)
    for db in dbs:
        for name in names[db]:
            wait_loaded(targets[db], name)
            assert schema_of(targets[db], name) == schema_of(sources[db], name)
            assert set(targets[db].list_partitions(name)) == set(sources[db].list_partitions(name))
            assert_same_rows(sources[db], targets[db], name, ALL_SCALARS + ["v", "extra"], timeout=90)
    for db in dbs:
        for name in names[db]:
            sources[db].release_collection(name)
            sources[db].drop_collection(name)
        for name in names[db]:
            wait_collection(targets[db], name, present=False)
        cdc.source.drop_database(db)


def test_get_shows_lag_and_position_shows_checkpoints(cdc, unique_name):
    name = unique_name("lag")
    cdc.source.create_collection(name, schema=full_schema(), shards_num=2)
    cdc.source.insert(name, make_rows(0, 10))
    wait_collection(cdc.target, name)

    created = cdc.source.describe_collection(name)["created_timestamp"]

    def fresh_channels():
        channels = cdc.server.task(cdc.task_id)["channels"]
        dml = [c for c in channels if "rootcoord-dml" in c["channel"]]
        return dml and all(c["lag_seconds"] is not None and c["lag_seconds"] < 5 and c["confirmed_ts"] > created
                           for c in dml) and channels
    channels = wait_until(fresh_channels, 30, what="every channel confirmed past the creation, within 5 s")
    answer = cdc.server.call("position", task_id=cdc.task_id)
    positions = answer["positions"] + answer["op_positions"]  # the replicate channel's is an op position
    assert {p["channel"] for p in positions} >= {c["channel"] for c in channels if c["confirmed_ts"]}
    assert all(p["timestamp"] > 0 and p["msg_id"] for p in positions)
    cdc.source.drop_collection(name)
    wait_collection(cdc.target, name, present=False)


def test_the_source_clock_is_read_from_the_source_tso(stack):
    """The stand-in for time ticks (issue 17, item 5) is a time the source's own clock passed, read from the
    TSO window Milvus saves in its etcd; on this one-host stack it is at most a few seconds behind now."""
    settings = m.SourceSettings(etcd=m.EtcdSettings(endpoints=(f"http://{stack['etcd']}",)),
                                root_path=stack["source_root_path"], meta_sub_path="meta",
                                default_partition_name="_default", read_chan_len=1,
                                replicate_chan="by-dev-replicate-msg", mq_type=m.MqType.KAFKA)
    meta = m.SourceMeta(settings)
    try:
        assert meta.revision() > 0
        passed, read_at = meta.source_time
        assert time.time() - 4 <= passed <= time.time(), "not the source's clock less at most its 3 s window"
        assert abs(read_at - time.monotonic()) < 2
    finally:
        meta.close()
