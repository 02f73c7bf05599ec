"""The Pulsar reader: Milvus's own messages, taken live from the Kafka-backed source, are written to pulsar-lite
with pulsar-client, read back through the CDC's Pulsar reader (a server configured for Pulsar) and applied to
the real target. (Milvus 2.3.5 itself cannot run on pulsar-lite: its Go client rejects pulsar-lite's checksums.)"""
from __future__ import annotations

import threading

import grpc
import pulsar
import pytest
from kafka import KafkaConsumer, TopicPartition
from pymilvus import DataType, MilvusClient
from pymilvus.grpc_gen import common_pb2, milvus_pb2, milvus_pb2_grpc, msg_pb2

from helpers import CdcServer, assert_same_rows, client, server_config, wait_until

REPLICATE = "by-dev-replicate-msg"


class KafkaToPulsar:
    """Copies records of some Kafka topics, from given offsets on, to same-named Pulsar topics, as they come:
    a stand-in for a source Milvus that writes to Pulsar."""

    def __init__(self, kafka_address: str, pulsar_url: str, starts: dict[str, int]):
        self.consumer = KafkaConsumer(bootstrap_servers=kafka_address, enable_auto_commit=False)
        self.consumer.assign([TopicPartition(t, 0) for t in starts])
        for topic, offset in starts.items():
            self.consumer.seek(TopicPartition(topic, 0), offset)
        self.client = pulsar.Client(pulsar_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
        self.producers = {t: self.client.create_producer(f"persistent://public/default/{t}",
                                                         batching_enabled=False) for t in starts}
        self.copied = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stopping.is_set():
            for partition, records in self.consumer.poll(timeout_ms=100).items():
                for record in records:
                    self.producers[partition.topic].send(record.value)
                    self.copied += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stopping.set()
        self.thread.join(10)
        self.client.close()
        self.consumer.close()


def end_offset(kafka_address: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=kafka_address)
    try:
        if consumer.partitions_for_topic(topic) is None:
            return 0
        partition = TopicPartition(topic, 0)
        return consumer.end_offsets([partition])[partition]
    finally:
        consumer.close()


def create_collection_offset(kafka_address: str, topic: str, collection_id: int) -> int:
    """The offset of the collection's CreateCollection record on a topic (its start position)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka_address, enable_auto_commit=False)
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    end = consumer.end_offsets([partition])[partition]
    consumer.seek(partition, max(0, end - 3000))
    try:
        while consumer.position(partition) < end:
            for record in consumer.poll(timeout_ms=1000).get(partition, []):
                if common_pb2.MsgHeader.FromString(record.value).base.msg_type == common_pb2.CreateCollection \
                        and msg_pb2.CreateCollectionRequest.FromString(record.value).collectionID == collection_id:
                    return record.offset
    finally:
        consumer.close()
    raise AssertionError(f"no CreateCollection record of {collection_id} on {topic}")


@pytest.fixture
def pulsar_cdc(stack, tmp_path):
    config = server_config(stack, tmp_path)
    del config["sourceConfig"]["kafka"]
    config["sourceConfig"]["pulsar"] = {"address": stack["pulsar"], "tenant": "public", "namespace": "default"}
    server = CdcServer(config, tmp_path).start()
    yield server
    server.stop()


def test_pulsar_reader_replicates_milvus_messages(stack, pulsar_cdc, unique_name):
    name = unique_name("pulsar")
    source, target = client(stack["source_milvus"]), client(stack["target_milvus"])
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("s", DataType.VARCHAR, max_length=32)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
    replicate_start = end_offset(stack["kafka"], REPLICATE)
    source.create_collection(name, schema=schema, shards_num=2)
    stub = milvus_pb2_grpc.MilvusServiceStub(grpc.insecure_channel(stack["source_milvus"].removeprefix("http://")))
    described = stub.DescribeCollection(milvus_pb2.DescribeCollectionRequest(collection_name=name))
    starts = {t: create_collection_offset(stack["kafka"], t, described.collectionID)
              for t in described.physical_channel_names}
    starts[REPLICATE] = replicate_start

    task_id = pulsar_cdc.create_task(stack["target_milvus"], collections=[name])
    with KafkaToPulsar(stack["kafka"], stack["pulsar"], starts) as relay:
        params = source.prepare_index_params()
        params.add_index("v", index_type="FLAT", metric_type="L2")
        source.create_index(name, params)
        source.load_collection(name)
        source.insert(name, [{"id": i, "s": f"p{i}", "v": [i / 10] * 4, "tag": i % 5} for i in range(500)])
        source.delete(name, ids=list(range(0, 500, 10)))
        wait_until(lambda: target.has_collection(name) and
                   str(target.get_load_state(name)["state"]).endswith("Loaded"), 90, what="the copy loaded")
        rows = assert_same_rows(source, target, name, ["id", "s", "v", "tag"])
        assert len(rows) == 450
        task = pulsar_cdc.task(task_id)
        assert task["state"] == "Running", task.get("reason")
        assert any(c["confirmed_ts"] for c in task["channels"])
        positions = pulsar_cdc.call("position", task_id=task_id)["positions"]
        assert {p["channel"] for p in positions} >= set(described.physical_channel_names)

        source.release_collection(name)
        source.drop_collection(name)
        wait_until(lambda: not target.has_collection(name), 60, what="the drop, read from Pulsar")
        assert relay.copied > 0
    pulsar_cdc.call("delete", task_id=task_id)
