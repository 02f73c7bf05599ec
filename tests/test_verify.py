"""The verify request on the real stack (issue 19): a copy under live load verifies equal, run after run, and
differences made on the target behind the task's back are found and named."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from pymilvus import DataType, MilvusClient

from helpers import ROOT, assert_same_rows, running_server, wait_until
from test_recovery import InsertLoad, loaded_collection

RUNS = int(os.environ.get("CDC_VERIFY_RUNS", "2"))  # under live load; the README's figure is for 20


def verified(server, task_id: str, **data) -> dict:
    started = server.call("verify", task_id=task_id, **data)["verify"]
    assert started["state"] == "running", started
    return wait_until(lambda: (v := server.task(task_id).get("verify")) and v["state"] != "running" and v,
                      300, 0.5, "verify to end")


def cli(server, task_id: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "milvus_cdc.py"), "verify", "-c", str(server.config_path),
                           "--task", task_id, *args], capture_output=True, text=True, timeout=300)


def replicate_on_target(uri: str, name: str, rows: list[dict] = (), deletes: list[int] = ()) -> None:
    """Rows written to (or deleted from) a one-shard copy on the target behind the task's back, with the
    ReplicateMessage calls the CDC itself makes (a replicating target refuses plain writes)."""
    import grpc
    from pymilvus import mkts_from_unixtime
    from pymilvus.grpc_gen import common_pb2, milvus_pb2, milvus_pb2_grpc, msg_pb2, schema_pb2
    with grpc.insecure_channel(uri.split("://", 1)[1]) as channel:
        stub = milvus_pb2_grpc.MilvusServiceStub(channel)
        meta = [("authorization", "cm9vdDpNaWx2dXM=")]  # root:Milvus
        described = stub.DescribeCollection(milvus_pb2.DescribeCollectionRequest(collection_name=name),
                                            metadata=meta, timeout=30)
        partitions = stub.ShowPartitions(milvus_pb2.ShowPartitionsRequest(collection_name=name), metadata=meta,
                                         timeout=30)
        partition_id = dict(zip(partitions.partition_names, partitions.partitionIDs))["_default"]
        field_ids = {f.name: f.fieldID for f in described.schema.fields}
        ts = mkts_from_unixtime(time.time())
        base = {"db_name": "default", "collection_name": name, "partition_name": "_default",
                "collectionID": described.collectionID, "partitionID": partition_id,
                "shardName": described.virtual_channel_names[0]}
        messages = []
        if rows:
            fields = [schema_pb2.FieldData(field_name="id", field_id=field_ids["id"], type=schema_pb2.Int64,
                                           scalars=schema_pb2.ScalarField(long_data=schema_pb2.LongArray(
                                               data=[r["id"] for r in rows]))),
                      schema_pb2.FieldData(field_name="s", field_id=field_ids["s"], type=schema_pb2.VarChar,
                                           scalars=schema_pb2.ScalarField(string_data=schema_pb2.StringArray(
                                               data=[r["s"] for r in rows]))),
                      schema_pb2.FieldData(field_name="v", field_id=field_ids["v"], type=schema_pb2.FloatVector,
                                           vectors=schema_pb2.VectorField(dim=4, float_vector=schema_pb2.FloatArray(
                                               data=[x for r in rows for x in r["v"]])))]
            messages.append(msg_pb2.InsertRequest(
                base=common_pb2.MsgBase(msg_type=common_pb2.Insert, timestamp=ts, msgID=ts), **base,
                timestamps=[ts] * len(rows), rowIDs=[r["id"] for r in rows], num_rows=len(rows),
                version=msg_pb2.ColumnBased, fields_data=fields).SerializeToString())
        if deletes:
            messages.append(msg_pb2.DeleteRequest(
                base=common_pb2.MsgBase(msg_type=common_pb2.Delete, timestamp=ts + 1, msgID=ts + 1), **base,
                primary_keys=schema_pb2.IDs(int_id=schema_pb2.LongArray(data=list(deletes))),
                timestamps=[ts + 1] * len(deletes), num_rows=len(deletes)).SerializeToString())
        answer = stub.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(
            channel_name=described.physical_channel_names[0], Msgs=messages), metadata=meta, timeout=30)
        assert answer.status.code == 0 and answer.status.error_code == 0, answer


def test_a_copy_under_live_load_verifies_equal_run_after_run(stack, tmp_path, unique_name):
    name = unique_name("verify_live")
    source, target = loaded_collection(stack, name)
    with running_server(stack, tmp_path) as server:
        task_id = server.create_task(stack["target_milvus"], collections=(name,))
        try:
            with InsertLoad(stack["source_milvus"], name) as load:
                wait_until(lambda: load.next_id > 3000, 120, 0.5, "rows on the source")
                wait_until(lambda: target.has_collection(name) and
                           str(target.get_load_state(name)["state"]).endswith("Loaded"), 90, what="the copy loaded")
                results = [verified(server, task_id, sample_vectors=200) for _ in range(RUNS)]
                by_hand = cli(server, task_id, "--collection", name)  # the command line, still under load
            assert by_hand.returncode == 0 and by_hand.stdout.startswith("equal: 1 collection(s)"), by_hand
            for result in results:
                assert result["state"] == "equal", result
                assert result["differences"] == [] and result["collections"] == 1 == result["collections_done"]
                assert result["rows_compared"] > 1000, result
            status, answer = server.post({"request_type": "verify", "request_data": {
                "task_id": task_id, "collections": ["no_such_collection"]}})
            assert status == 200  # started: it ends failed, saying so
            failed = wait_until(lambda: (v := server.task(task_id)["verify"])["state"] != "running" and v, 60, 0.5)
            assert failed["state"] == "failed" and "no_such_collection" in failed["error"], failed
            status, answer = server.post({"request_type": "verify", "request_data": {
                "task_id": task_id, "sample_vectors": -1}})
            assert status == 400 and "sample_vectors" in answer["message"], answer
        finally:
            source.drop_collection(name)


def test_differences_made_behind_the_tasks_back_are_found_and_named(stack, tmp_path, unique_name):
    rows_name, shape_name = unique_name("verify_rows"), unique_name("verify_shape")
    source, target = loaded_collection(stack, rows_name, shards=1)
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    with running_server(stack, tmp_path) as server:
        task_id = server.create_task(stack["target_milvus"], collections=(rows_name, shape_name))
        try:
            source.insert(rows_name, [{"id": i, "s": f"v{i}", "v": [float(i), 0.0, 0.0, 1.0]} for i in range(1000)])
            source.create_collection(shape_name, schema=schema, shards_num=1)
            source.create_partition(shape_name, "p1")
            index = source.prepare_index_params()
            index.add_index("v", index_type="IVF_FLAT", metric_type="L2", params={"nlist": 128})
            source.create_index(shape_name, index)
            assert_same_rows(source, target, rows_name, ["id", "s", "v"], timeout=120)
            wait_until(lambda: target.has_collection(shape_name) and target.has_partition(shape_name, "p1") and
                       target.list_indexes(shape_name), 60, 0.5, "the second copy made")
            assert verified(server, task_id)["state"] == "equal"
            # behind the task's back, on the target
            replicate_on_target(stack["target_milvus"], rows_name, deletes=[5, 7])
            replicate_on_target(stack["target_milvus"], rows_name, rows=[
                {"id": 10 ** 9, "s": "extra", "v": [1.0, 1.0, 1.0, 1.0]},
                {"id": 7, "s": "v7", "v": [7.5, 0.0, 0.0, 1.0]}])
            target.drop_partition(shape_name, "p1")
            target.drop_index(shape_name, "v")
            other = target.prepare_index_params()
            other.add_index("v", index_type="IVF_FLAT", metric_type="L2", params={"nlist": 64})
            target.create_index(shape_name, other)
            time.sleep(2)
            result = verified(server, task_id, sample_vectors=2000)
            assert result["state"] == "different", result
            found = {(d["collection"].split(".", 1)[1], d["what"].split(":")[0]): d for d in result["differences"]}
            assert found[(rows_name, "rows missing on the target")]["example_keys"] == [5], result
            assert found[(rows_name, "rows on the target that the source does not have")]["example_keys"] == \
                [10 ** 9], result
            assert found[(rows_name, "rows whose values differ")]["example_keys"] == [7], result
            assert (shape_name, "partitions") in found and (shape_name, "indexes") in found, result
            assert "nlist" in found[(shape_name, "indexes")]["what"], result
            assert len(result["differences"]) == 5, result
            by_hand = cli(server, task_id, "--json", "--sample-vectors", "2000")
            assert by_hand.returncode == 1, by_hand
            assert len(json.loads(by_hand.stdout)["differences"]) == 5, by_hand.stdout
            assert any(shape_name in note and "not loaded" in note for note in result["notes"]), result
            metrics = urllib.request.urlopen(server.url.rsplit("/", 1)[0] + "/metrics", timeout=10).read().decode()
            assert f'milvus_cdc_verify_result{{result="different",task_id="{task_id}"}} 1.0' in metrics
            assert f'milvus_cdc_verify_differing_rows{{task_id="{task_id}"}}' in metrics
        finally:
            for name in (rows_name, shape_name):
                if source.has_collection(name):
                    source.drop_collection(name)


def test_a_database_the_task_replicates_as_such_is_missing_on_the_target():
    """Pure logic, with fake clients: a `*` task's databases are compared by name (through its name mapping)."""
    import threading
    from types import SimpleNamespace

    import milvus_cdc as m
    task = m.TaskInfo("t1", m.ConnectParam("http://target:19530"), [{"name": "*"}],
                      name_mapping=[{"source_db": "db1", "target_db": "db1_copy", "collection_mapping": {}}])
    source = m.SourceSettings(etcd=m.EtcdSettings(("127.0.0.1:2379",)), root_path="by-dev", meta_sub_path="meta",
                              default_partition_name="_default", read_chan_len=4, replicate_chan="r",
                              mq_type=m.MqType.KAFKA, milvus_uri="http://source:19530")
    run = m.Verification()
    verifier = m.CopyVerifier(task, source, m.VerifyRequest(), run, threading.Event())
    listed = {"source": ["default", "db1", "db2"], "target": ["default", "db1_copy"]}
    verifier._client = lambda side, db: SimpleNamespace(list_databases=lambda: listed[side])
    verifier._databases()
    assert [d.public() for d in run.differences] == [
        {"collection": "db2", "what": "database missing on the target (as db2)"}]
    with pytest.raises(m.ApiError, match="sourceConfig.milvus.uri"):
        m.CopyVerifier(task, dataclasses.replace(source, milvus_uri=""), m.VerifyRequest(), run, threading.Event())


def test_deleting_a_task_stops_its_verify_run_and_its_result_goes_with_it(tmp_path, monkeypatch):
    """Pure logic: a verify run of a deleted task ended only with the server, and its gauges came back after the
    delete had removed the task's series."""
    import threading
    import milvus_cdc as m
    config, _ = m.load_config(str(ROOT / "config.yaml"))
    config = dataclasses.replace(config, source=dataclasses.replace(config.source, milvus_uri="http://127.0.0.1:9"))
    server = m.TaskManager(config, m.SqliteMetaStore(str(tmp_path / "meta.db"), "cdc"))
    comparing = threading.Event()

    def compare(self, db_name, name):
        comparing.set()
        self.stop.wait(60)
    monkeypatch.setattr(m.CopyVerifier, "_databases", lambda self: None)
    monkeypatch.setattr(m.CopyVerifier, "_followed", lambda self: [("default", f"c{i}") for i in range(3)])
    monkeypatch.setattr(m.CopyVerifier, "_collection", compare)
    try:
        task = server.tasks["t1"] = m.TaskInfo("t1", m.ConnectParam("http://127.0.0.1:9"), [{"name": "*"}],
                                               state=m.TaskState.PAUSED)
        server.store.save_task("t1", task.to_store())
        server.verify("t1", {})
        run = server.verifications["t1"]
        assert comparing.wait(10) and run.state == m.VerifyState.RUNNING
        started = time.monotonic()
        server.delete("t1")
        wait_until(lambda: run.state != m.VerifyState.RUNNING, 10, 0.02, "the run to stop")
        assert time.monotonic() - started < 5 and run.state == m.VerifyState.FAILED and "deleted" in run.error
        assert run.collections_done < 3 and "t1" not in server.verifications
        time.sleep(0.2)  # the run's thread publishes its gauges right after it ends, if it does
        assert not server.metrics.series.get("t1"), "no series of a deleted task"
    finally:
        server.shutdown()
        server.store.close()


def test_the_last_verify_result_is_kept_with_the_task_across_a_restart(tmp_path, monkeypatch):
    """Pure logic: `get` shows the last result after the server restarted, and a later write of the task (a
    pause, a resume) keeps it."""
    import milvus_cdc as m
    config, _ = m.load_config(str(ROOT / "config.yaml"))
    config = dataclasses.replace(config, source=dataclasses.replace(config.source, milvus_uri="http://127.0.0.1:9"))
    monkeypatch.setattr(m.CopyVerifier, "_databases", lambda self: None)
    monkeypatch.setattr(m.CopyVerifier, "_followed", lambda self: [("default", "c0")])
    monkeypatch.setattr(m.CopyVerifier, "_collection",
                        lambda self, db, name: self._differ(f"{db}.{name}", "shards: source 2, target 1"))
    path = str(tmp_path / "meta.db")
    server = m.TaskManager(config, m.SqliteMetaStore(path, "cdc"))
    try:
        task = server.tasks["t1"] = m.TaskInfo("t1", m.ConnectParam("http://127.0.0.1:9"), [{"name": "*"}],
                                               state=m.TaskState.PAUSED, reason="paused by the user")
        server.store.save_task("t1", task.to_store())
        server.verify("t1", {})
        wait_until(lambda: server.store.load_tasks()["t1"].get("last_verify"), 10, 0.05, "the result stored")
        server._store(server.tasks["t1"], reason="written again")  # as a pause or resume writes the task
    finally:
        server.shutdown()
        server.store.close()
    again = m.TaskManager(config, m.SqliteMetaStore(path, "cdc"))
    try:
        again.restore()
        shown = again.get("t1")["verify"]
        assert shown["state"] == "different" and shown["differences"] == [
            {"collection": "default.c0", "what": "shards: source 2, target 1"}], shown
    finally:
        again.shutdown()
        again.store.close()


def test_an_unloaded_collection_is_described_by_its_statistics():
    from types import SimpleNamespace

    import milvus_cdc as m

    def side(rows):
        return SimpleNamespace(get_collection_stats=lambda name: {"row_count": rows}), "c"
    note = m.CopyVerifier._unloaded_note("db.c", side(1000), side(900))
    assert "rows not compared" in note and "1000 flushed row(s) on the source, 900 on the target" in note
    assert m.CopyVerifier._unloaded_note("db.c", side(5), side(5)).endswith("(equal)")
