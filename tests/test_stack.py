"""Self-test of the real stack: the source publishes what the CDC will read, the target is a replica-only one."""
from __future__ import annotations

import time

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition
from pymilvus import DataType, MilvusClient
from pymilvus.grpc_gen import common_pb2, milvus_pb2, milvus_pb2_grpc, msg_pb2


def test_source_publishes_insert_and_delete_on_kafka(stack, unique_name):
    source = MilvusClient(uri=stack["source_milvus"])
    name = unique_name("stack")
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=4)
    source.create_collection(name, schema=schema, shards_num=1)
    try:
        collection_id = source.describe_collection(name)["collection_id"]
        source.insert(name, [{"id": i, "vec": [float(i)] * 4} for i in range(10)])
        source.delete(name, ids=[3, 4])

        channel = grpc.insecure_channel(stack["source_milvus"].removeprefix("http://"))
        described = milvus_pb2_grpc.MilvusServiceStub(channel).DescribeCollection(
            milvus_pb2.DescribeCollectionRequest(collection_name=name))
        topic = described.physical_channel_names[0]

        consumer = KafkaConsumer(bootstrap_servers=stack["kafka"], enable_auto_commit=False)
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        inserted, deleted = [], []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (len(inserted) == 10 and len(deleted) == 2):
            for record in consumer.poll(timeout_ms=500).get(partition, []):
                header = common_pb2.MsgHeader.FromString(record.value)
                if header.base.msg_type == common_pb2.Insert:
                    msg = msg_pb2.InsertRequest.FromString(record.value)
                    if msg.collectionID == collection_id:
                        inserted += msg.fields_data[0].scalars.long_data.data
                elif header.base.msg_type == common_pb2.Delete:
                    msg = msg_pb2.DeleteRequest.FromString(record.value)
                    if msg.collectionID == collection_id:
                        deleted += msg.primary_keys.int_id.data
        consumer.close()
        assert sorted(inserted) == list(range(10))
        assert sorted(deleted) == [3, 4]
    finally:
        source.drop_collection(name)


def test_target_serves_replicate_message(stack):
    """ttMsgEnabled=false: ReplicateMessage is served (a ttMsgEnabled=true server answers 1900).

    Nothing is created on the target here: a collection whose channels never get ticks blocks the target's
    datanode, and a plain drop on a replica-only target retries its denied write forever.
    """
    stub = milvus_pb2_grpc.MilvusServiceStub(grpc.insecure_channel(stack["target_milvus"].removeprefix("http://")))
    answer = stub.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(channel_name="by-dev-replicate-msg"))
    assert answer.status.code == 0, answer.status
    source = milvus_pb2_grpc.MilvusServiceStub(grpc.insecure_channel(stack["source_milvus"].removeprefix("http://")))
    refused = source.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(channel_name="by-dev-replicate-msg"))
    assert refused.status.code == 1900, refused.status


def test_up_then_down_leaves_no_process(tmp_path):
    """The command line: `up` prints the endpoints and leaves the stack running; `down` stops all of it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from stack import Part
    env = {**os.environ, "MILVUS_CDC_STACK_STATE": str(tmp_path / "state.json")}
    script = str(Path(__file__).resolve().parent / "stack.py")
    up = subprocess.run([sys.executable, script, "up", "--dir", str(tmp_path / "stack")], env=env,
                        capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        endpoints = json.loads(up.stdout)
        assert {"etcd", "kafka", "pulsar", "mysql", "source_milvus", "target_milvus"} <= set(endpoints)
        parts = [Part(**p) for p in json.loads((tmp_path / "state.json").read_text())["parts"]]
        assert {p.name for p in parts} >= {"etcd", "kafka", "pulsar", "source-milvus", "target-milvus"}
        assert all(p.alive() for p in parts)
    finally:
        down = subprocess.run([sys.executable, script, "down"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0, down.stderr
    assert not any(p.alive() for p in parts), [p.name for p in parts if p.alive()]
    assert not (tmp_path / "state.json").exists() and not (tmp_path / "stack").exists()


def test_a_part_that_does_not_come_up_is_named_and_nothing_is_left(tmp_path):
    from stack import Stack, StackError

    class BrokenBroker(Stack):
        def _start_kafka(self):
            part = self._spawn("kafka", ["sh", "-c", "echo 'broker exploded'; exit 3"])
            from stack import wait_until
            wait_until(part, lambda: False, 10, "Kafka metadata answer")

    broken = BrokenBroker(tmp_path / "stack", with_pulsar=False)
    with pytest.raises(StackError) as failure:
        broken.up()
    assert "kafka did not come up" in str(failure.value) and "broker exploded" in str(failure.value)
    assert broken.parts == [] and not (tmp_path / "stack").exists()
