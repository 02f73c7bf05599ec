"""A Go CDC user's requests, unchanged: the documented create shapes, task scope by database (db_collections),
renaming on the target (name_mapping), start positions, a chosen task_id, disable_auto_start, and the answers a Go
client reads (get under "task", position's Go fields, delete's ignore_not_found, maintenance).

The first part checks requests without servers; the rest runs on the real stack, firing source operations back to
back without waiting for the target in between."""
from __future__ import annotations

import base64

import pytest
from pymilvus import DataType, MilvusClient
from pymilvus.grpc_gen import msg_pb2

import milvus_cdc as m
from helpers import client, drop_everywhere, running_server, wait_until

REPLICATE = "by-dev-replicate-msg"


def create(data: dict) -> m.CreateRequest:
    return m.parse_create_request(data, 256, REPLICATE)


def connect(**param) -> dict:
    return {"milvus_connect_param": {"uri": "http://t:19530", **param}}


# ---------------------------------------------------------------------------------------------------------
# Requests, checked without servers
# ---------------------------------------------------------------------------------------------------------

def test_host_port_style_means_what_it_means_in_the_go_cdc():
    go = create({"milvus_connect_param": {"host": "t", "port": 19531, "username": "root", "password": "Milvus",
                                          "enable_tls": True, "connect_timeout": 10},
                 "collection_infos": [{"name": "*"}], "rpc_channel_info": {"name": REPLICATE}}).task
    assert (go.connect.uri, go.connect.token) == ("https://t:19531", "root:Milvus")
    empty = create({"milvus_connect_param": {"host": "t", "port": 19530, "username": "", "password": "",
                                             "enable_tls": False, "ignore_partition": True, "connect_timeout": 10},
                    "collection_infos": [{"name": "*"}]})
    assert (empty.task.connect.uri, empty.task.connect.token) == ("http://t:19530", "")
    assert any("ignore_partition" in note for note in empty.notes)
    mixed = create({"milvus_connect_param": {"uri": "https://t:19530", "host": "t", "port": 19530,
                                             "enable_tls": True, "dial_config": {"server_name": "t"}},
                    "collection_infos": [{"name": "*"}]}).task
    assert mixed.connect.secure and mixed.connect.server_name == "t"
    shown = m.TaskInfo.from_store(go.to_store()).public()
    assert shown["milvus_connect_param"] == {"uri": "https://t:19531", "connect_timeout": 10.0, "host": "t",
                                             "port": 19531, "enable_tls": True}
    assert "Milvus" not in str(shown)


@pytest.mark.parametrize("data, needle", [
    ({"milvus_connect_param": {"host": "t"}, "collection_infos": [{"name": "*"}]}, "uri is required"),
    ({"milvus_connect_param": {"host": "t", "port": 1, "username": "root"}, "collection_infos": [{"name": "*"}]},
     "username and password go together"),
    ({**connect(enable_tls=True), "collection_infos": [{"name": "*"}]}, "enable_tls"),
    ({**connect(token="a:b", username="c", password="d"), "collection_infos": [{"name": "*"}]}, "token and"),
    ({**connect(enable_tsl=True), "collection_infos": [{"name": "*"}]}, "did you mean enable_tls"),
    ({**connect(), "collection_infos": [{"name": "*"}], "rpc_channel_info": {"name": "other-msg"}},
     REPLICATE),
    ({**connect(), "collection_infos": [{"name": "*"}], "task_id": "no/slash"}, "task_id"),
    ({**connect(), "collection_infos": [{"name": "*"}], "disable_auto_start": "yes"}, "disable_auto_start"),
    ({**connect(), "db_collections": {"d": [{"name": "a.b"}]}}, "not a collection name"),
    ({**connect(), "db_collections": {"*": [{"name": "c"}]}}, "every database"),
    ({**connect(), "db_collections": {"d-1": [{"name": "*"}]}}, "not a database name"),
    ({**connect(), "collection_infos": [{"name": "*", "positions": {"ch_1v0": "AAA="}}]}, "top-level positions"),
    ({**connect(), "collection_infos": [{"name": "c", "positions": {"ch_1v0": "***"}}]}, "not base64"),
    ({**connect(), "collection_infos": [{"name": "*"}], "name_mapping": [
        {"source_db": "a", "target_db": "x"}, {"source_db": "b", "target_db": "x"}]}, "two databases to x"),
    ({**connect(), "collection_infos": [{"name": "*"}], "name_mapping": [
        {"source_db": "a", "target_db": "x", "collection_mapping": {"c": "z", "d": "z"}}]}, "two collections"),
    ({**connect(), "collection_infos": [{"name": "*"}], "kafka_connect_param": {"address": "k:9092"}},
     "Milvus target only"),
    ({**connect(), "collection_infos": [{"name": "*"}], "nmae_mapping": []}, "did you mean name_mapping"),
])
def test_go_fields_that_cannot_be_honoured_as_given_are_refused_saying_why(data, needle):
    with pytest.raises(m.ApiError) as refused:
        create(data)
    assert refused.value.code == 400 and needle in refused.value.message, refused.value.message


def test_every_field_of_the_go_request_model_is_accepted():
    position = m.StartPosition("by-dev-rootcoord-dml_3_77v0", b"\x05" + 7 * b"\0", 42).encode()
    request = create({
        "milvus_connect_param": {"uri": "http://t:19530", "token": "root:Milvus", "connect_timeout": 10,
                                 "channel_num": 16, "ignore_partition": False, "dial_config": {}},
        "kafka_connect_param": {"address": "", "topic": ""}, "collection_infos": [],
        "db_collections": {"d1": [{"name": "c1", "positions": {"by-dev-rootcoord-dml_3_77v0": position},
                                   "use_start_position": False}], "d2": [{"name": "*", "use_start_position": True}]},
        "rpc_channel_info": {"name": REPLICATE, "position": base64.b64encode(b"\x09" + 7 * b"\0").decode()},
        "extra_info": {"enable_user_role": False}, "buffer_config": {"period": 0, "size": 0},
        "name_mapping": [{"source_db": "d1", "target_db": "t1", "collection_mapping": {"c1": "k1"}}],
        "disable_auto_start": True, "task_id": "go-task.1", "positions": {}})
    task = request.task
    assert task.task_id == "go-task.1" and task.disable_auto_start
    assert task.filter.matches("d1", "c1") and task.filter.matches("d2", "any") and not task.filter.matches("d1", "c2")
    assert task.filter.covers_database("d2") and not task.filter.covers_database("d1")
    assert task.replayed.matches("d2", "any") and not task.replayed.matches("d1", "c1")  # d2's * replays all
    assert task.start_positions == [m.StartPosition(REPLICATE, b"\x09" + 7 * b"\0", 0, ""),
                                    m.StartPosition("by-dev-rootcoord-dml_3", b"\x05" + 7 * b"\0", 42, "d1.c1")]
    assert task.names.collection("d1", "c1") == ("t1", "k1") and task.names.collection("d1", "c9") == ("t1", "c9")
    assert task.names.source("t1", "k1") == ("d1", "c1") and task.names.database("d3") == "d3"
    assert any("channel_num" in note for note in request.notes)
    again = m.TaskInfo.from_store(task.to_store())
    assert again == task


def test_a_position_is_read_in_either_form_and_written_in_the_go_form():
    raw = (1554).to_bytes(8, "little")  # parses as a MsgPosition by chance: it names no channel, so it is a bare id
    assert m.StartPosition.decode("ch_1", base64.b64encode(raw).decode()) == m.StartPosition("ch_1", raw)
    ours = m.StartPosition("ch_1", raw, 4242)
    assert m.StartPosition.decode("ch_1_99v1", ours.encode(), "default.c") == m.StartPosition("ch_1", raw, 4242,
                                                                                            "default.c")


def test_scopes_overlap_by_database_and_name():
    def f(*names):
        return m.CollectionFilter(list(names))
    assert f("d.*").overlaps(f("d.c")) and f("d.c").overlaps(f("d.*")) and not f("d.*").overlaps(f("e.c"))
    assert f("c").overlaps(f("default.*")) and not f("d.*").overlaps(f("e.*")) and f("*").overlaps(f("e.c"))


# ---------------------------------------------------------------------------------------------------------
# On the real stack
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def cdc(stack, tmp_path):
    with running_server(stack, tmp_path) as server:
        yield server


def make_collection(milvus, name: str, shards: int = 1) -> None:
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("s", DataType.VARCHAR, max_length=32)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    milvus.create_collection(name, schema=schema, shards_num=shards)


def index_and_load(milvus, name: str) -> None:
    params = milvus.prepare_index_params()
    params.add_index("v", index_type="IVF_FLAT", metric_type="L2", params={"nlist": 8})
    milvus.create_index(name, params)
    milvus.load_collection(name)


def rows(start: int, count: int) -> list[dict]:
    return [{"id": i, "s": f"r{i}", "v": [i / 7] * 4} for i in range(start, start + count)]


def keys_of(milvus, name: str, consistency: str = "Strong") -> list[int]:
    """Every key, duplicates kept."""
    got = milvus.query(name, filter="id >= 0", output_fields=["id"], limit=16384, consistency_level=consistency,
                        timeout=30)  # a paused task: Strong waits for ticks that never come
    return sorted(r["id"] for r in got)


def same_keys(source, target, source_name: str, target_name: str, timeout: float = 90) -> list[int]:
    """Wait until the target's copy has exactly the source's keys, each once."""
    expected = keys_of(source, source_name)
    wait_until(lambda: keys_of(target, target_name) == expected, timeout,
               what=f"the keys of {source_name} on the target as {target_name} (source has {len(expected)})")
    return expected


def loaded(milvus, name: str) -> bool:
    return milvus.has_collection(name) and str(milvus.get_load_state(name)["state"]).endswith("Loaded")


def go_param(stack: dict, **extra) -> dict:
    host, port = stack["target_milvus"].removeprefix("http://").rsplit(":", 1)
    return {"host": host, "port": int(port), **extra}


@pytest.mark.parametrize("shape", ["usage document", "milvus.io", "empty credentials"])
def test_each_documented_create_shape_replicates_a_new_collection(stack, cdc, unique_name, shape):
    param = {
        "usage document": {"uri": stack["target_milvus"], "token": "root:Milvus", "connect_timeout": 10},
        "milvus.io": go_param(stack, username="root", password="Milvus", enable_tls=False, connect_timeout=10),
        "empty credentials": go_param(stack, username="", password="", enable_tls=False, ignore_partition=True,
                                      connect_timeout=10)}[shape]
    data = {"milvus_connect_param": param, "collection_infos": [{"name": "*"}]}
    if shape == "milvus.io":
        data["rpc_channel_info"] = {"name": REPLICATE}
    task_id = cdc.call("create", **data)["task_id"]
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    name = unique_name("shape")
    make_collection(source, name)
    source.insert(name, rows(0, 50))
    index_and_load(source, name)
    source.insert(name, rows(50, 50))
    assert same_keys(source, target, name, name) == list(range(100))
    wait_until(lambda: loaded(target, name), 60, what=f"{name} loaded on the target")
    answers = str(cdc.call("get", task_id=task_id)) + str(cdc.call("list"))
    assert "Milvus" not in answers and "Milvus" not in cdc.log_text().replace("Milvus CDC", "")
    drop_everywhere(source, target, name)
    cdc.call("delete", task_id=task_id)


def test_a_db_collections_task_replicates_that_database_and_nothing_of_another(stack, cdc, unique_name):
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    inside, outside = unique_name("dbin"), unique_name("dbout")
    task_id = cdc.call("create", milvus_connect_param={"uri": stack["target_milvus"]},
                       db_collections={inside: [{"name": "*"}]})["task_id"]
    assert cdc.call("get", task_id=task_id)["task"]["db_collections"] == {inside: [{"name": "*"}]}
    for db in (inside, outside):  # back to back, the target not waited for
        source.create_database(db)
        milvus = client(stack["source_milvus"], db)
        for name in ("a", "b"):
            make_collection(milvus, name)
            milvus.insert(name, rows(0, 30))
            index_and_load(milvus, name)
        milvus.insert("a", rows(30, 30))
    src_in, tgt_in = client(stack["source_milvus"], inside), client(stack["target_milvus"], inside)
    same_keys(src_in, tgt_in, "a", "a")
    same_keys(src_in, tgt_in, "b", "b")
    wait_until(lambda: loaded(tgt_in, "a"), 60, what="a loaded on the target")
    assert outside not in target.list_databases(), "a database outside the task's scope was replicated"
    for name in ("a", "b"):
        src_in.release_collection(name)
        src_in.drop_collection(name)
    source.drop_database(inside)
    wait_until(lambda: inside not in target.list_databases(), 60, what=f"database {inside} dropped on the target")
    assert outside not in target.list_databases()
    cdc.call("delete", task_id=task_id)
    src_out = client(stack["source_milvus"], outside)
    for name in ("a", "b"):
        src_out.release_collection(name)
        src_out.drop_collection(name)
    source.drop_database(outside)


def test_a_name_mapping_task_puts_rows_indexes_load_and_drops_on_the_mapped_names(stack, cdc, unique_name):
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    db, mapped_db = unique_name("srcdb"), unique_name("dstdb")
    task_id = cdc.call("create", milvus_connect_param={"uri": stack["target_milvus"]},
                       db_collections={db: [{"name": "*"}]},
                       name_mapping=[{"source_db": db, "target_db": mapped_db,
                                      "collection_mapping": {"orders": "orders_copy"}}])["task_id"]
    source.create_database(db)
    src = client(stack["source_milvus"], db)
    for name in ("orders", "plain"):
        make_collection(src, name, shards=2)
        src.insert(name, rows(0, 40))
        index_and_load(src, name)
    src.create_partition("orders", "p1")
    src.insert("orders", rows(100, 10), partition_name="p1")
    src.delete("orders", ids=[1, 2, 3])
    src.flush("orders")
    tgt = client(stack["target_milvus"], mapped_db)
    assert same_keys(src, tgt, "orders", "orders_copy") == [i for i in range(40) if i not in (1, 2, 3)] + \
        list(range(100, 110))
    same_keys(src, tgt, "plain", "plain")
    wait_until(lambda: loaded(tgt, "orders_copy"), 60, what="orders_copy loaded on the target")
    assert tgt.list_indexes("orders_copy") == ["v"]
    assert tgt.describe_index("orders_copy", "v")["index_type"] == "IVF_FLAT"
    assert set(tgt.list_partitions("orders_copy")) == {"_default", "p1"}
    assert db not in target.list_databases(), "the source's database name was made on the target too"
    src.release_collection("orders")
    src.drop_partition("orders", "p1")
    src.release_collection("plain")
    src.drop_collection("plain")
    wait_until(lambda: set(tgt.list_partitions("orders_copy")) == {"_default"} and not tgt.has_collection("plain"),
               60, what="the partition and collection drops on the mapped names")
    src.drop_collection("orders")
    source.drop_database(db)
    wait_until(lambda: mapped_db not in target.list_databases(), 60, what=f"database {mapped_db} dropped")
    cdc.call("delete", task_id=task_id)


def test_a_new_task_from_the_positions_of_a_deleted_one_has_every_row_once(stack, cdc, unique_name):
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    name = unique_name("pos")
    make_collection(source, name, shards=2)
    index_and_load(source, name)
    param = {"uri": stack["target_milvus"], "token": "root:Milvus"}
    first = cdc.call("create", milvus_connect_param=param, collection_infos=[{"name": name}])["task_id"]
    source.insert(name, rows(0, 200))
    source.delete(name, ids=[5, 6])
    same_keys(source, target, name, name)
    cdc.call("pause", task_id=first)
    answer = cdc.call("position", task_id=first)
    cdc.call("delete", task_id=first)
    source.insert(name, rows(200, 100))   # while no task runs
    source.delete(name, ids=[7, 250])
    collection_id = source.describe_collection(name)["collection_id"]
    by_pchannel = {p["channel_name"]: p for p in answer["positions"]}
    assert by_pchannel and all(set(p) >= {"channel_name", "msg_id", "time", "tt", "collection_id"}
                               for p in answer["positions"])
    for p in answer["positions"]:
        decoded = msg_pb2.MsgPosition.FromString(base64.b64decode(p["msg_id"]))
        assert decoded.channel_name == p["channel_name"] and decoded.msgID and decoded.timestamp == p["tt"]
    # The Go CDC's shape: positions keyed by the collection's vchannels, and the replicate channel's own.
    positions = {f"{pchannel}_{collection_id}v{shard}": p["msg_id"]
                 for shard, (pchannel, p) in enumerate(sorted(by_pchannel.items()))}
    second = cdc.call("create", milvus_connect_param=param,
                      collection_infos=[{"name": name, "positions": positions}],
                      rpc_channel_info={"name": REPLICATE, "position": answer["op_positions"][0]["msg_id"]})["task_id"]
    source.insert(name, rows(300, 50))
    expected = [i for i in range(350) if i not in (5, 6, 7, 250)]
    assert same_keys(source, target, name, name) == expected
    assert target.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong",
                        timeout=30)[0]["count(*)"] \
        == len(expected)
    drop_everywhere(source, target, name)
    cdc.call("delete", task_id=second)


def test_task_id_and_disable_auto_start(stack, cdc, unique_name):
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    name = unique_name("later")
    data = {"milvus_connect_param": {"uri": stack["target_milvus"]}, "collection_infos": [{"name": name}],
            "task_id": "my-task_1", "disable_auto_start": True}
    assert cdc.call("create", **data) == {"task_id": "my-task_1"}
    status, answer = cdc.post({"request_type": "create", "request_data": {**data, "collection_infos": [
        {"name": unique_name("other")}]}})
    assert status == 409 and "my-task_1" in answer["message"]
    task = cdc.call("get", task_id="my-task_1")["task"]
    assert task["state"] == "Initial" and task["disable_auto_start"] is True and "resume" in task["reason"]
    assert cdc.call("position", task_id="my-task_1")["op_positions"] == []  # not started: nothing pinned
    cdc.call("resume", task_id="my-task_1")
    make_collection(source, name)
    source.insert(name, rows(0, 20))
    index_and_load(source, name)
    same_keys(source, target, name, name)
    cdc.stop()   # a restart does not start it again, as in the Go CDC
    cdc.start()
    task = cdc.call("get", task_id="my-task_1")["Task"]
    assert task["state"] == "Paused" and task["reason"] == "the task is disabled auto start"
    cdc.call("resume", task_id="my-task_1")
    source.insert(name, rows(20, 20))
    same_keys(source, target, name, name)
    drop_everywhere(source, target, name)


def test_delete_ignore_not_found_and_maintenance(cdc):
    assert cdc.call("delete", task_id="no-such-task", ignore_not_found=True) == {}
    status, answer = cdc.post({"request_type": "delete", "request_data": {"task_id": "no-such-task"}})
    assert status == 404
    status, answer = cdc.post({"request_type": "maintenance", "request_data": {"operation": "set_force_log_msg"}})
    assert status == 400 and "set_log_level" in answer["message"]
    status, answer = cdc.post({"request_type": "maintenance", "request_data": {
        "operation": "set_log_level", "params": {"log_level": "loud"}}})
    assert status == 400 and "log_level" in answer["message"]
    assert cdc.call("maintenance", operation="set_log_level", params={"log_level": "warn"}) == {
        "state": "set log level to warn"}
    marker = len(cdc.log_text())
    cdc.call("delete", task_id="no-such-task", ignore_not_found=True)
    cdc.call("list")
    assert cdc.call("maintenance", operation="set_log_level", params={"log_level": "debug"})
    cdc.call("list")
    lines = cdc.log_text()[marker:].splitlines()
    switch = next(i for i, line in enumerate(lines) if "log level set to debug" in line)
    assert not any(" INFO " in line or " DEBUG " in line for line in lines[:switch]), lines
    assert any(" DEBUG " in line and "api: list answered 200" in line for line in lines[switch:]), lines
