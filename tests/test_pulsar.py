"""The Pulsar reader: Milvus's own messages, taken live from the Kafka-backed source, are written to pulsar-lite
with pulsar-client, read back through the CDC's Pulsar reader (a server configured for Pulsar) and applied to
the real target. (Milvus 2.3.5 itself cannot run on pulsar-lite: its Go client rejects pulsar-lite's checksums.)

The reader's end of a channel is tested on a fake reader and on a pulsar-lite of this module's own, without the
stack."""
from __future__ import annotations

import threading

import grpc
import pulsar
import pytest
from kafka import KafkaConsumer, TopicPartition
from pymilvus import DataType, MilvusClient
from pymilvus.grpc_gen import common_pb2, milvus_pb2, milvus_pb2_grpc, msg_pb2

import milvus_cdc as m
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


# ---------------------------------------------------------------------------------------------------------
# The reader's end of a channel
# ---------------------------------------------------------------------------------------------------------

def tick(ts: int) -> bytes:
    return m.MessageRewriter.time_tick(ts)


class FakeTopic:
    """A topic as the broker stores it, and how many of its messages the broker has pushed to the reader."""

    def __init__(self):
        self.stored: list[bytes] = []
        self.dispatched = 0


class FakeMessage:
    def __init__(self, index: int, payload: bytes):
        self.index, self.payload = index, payload

    def message_id(self):
        return pulsar.MessageId(-1, 0, self.index, -1)

    def data(self):
        return self.payload


class FakeReader:
    """pulsar-client's Reader as far as the CDC uses it: read_next sees only what the broker dispatched;
    has_message_available asks the broker for the topic's last message id, and, like pulsar-lite, the broker
    refuses that on a topic with no messages."""

    def __init__(self, topic: FakeTopic):
        self.topic, self.next, self.asked = topic, 0, 0
        self.failure: Exception | None = None  # what the broker answers to the next questions instead

    def read_next(self, timeout_millis=None):
        if self.next >= self.topic.dispatched:
            raise pulsar.Timeout()
        self.next += 1
        return FakeMessage(self.next - 1, self.topic.stored[self.next - 1])

    def has_message_available(self):
        self.asked += 1
        if self.failure is not None:
            raise self.failure
        if not self.topic.stored:
            raise pulsar.UnknownError("Pulsar error: UnknownError")
        return self.next < len(self.topic.stored)

    def close(self):
        pass


@pytest.fixture
def fake_pulsar(monkeypatch):
    """A PulsarChannelReader on one fake topic, channel "ch"; yields (reader, topic, the fake Reader)."""
    topic = FakeTopic()
    fakes: list[FakeReader] = []

    class FakeClient:
        def __init__(self, *_, **__):
            pass

        def create_reader(self, *_, **__):
            fakes.append(FakeReader(topic))
            return fakes[-1]

        def close(self):
            pass

    monkeypatch.setattr(pulsar, "Client", FakeClient)
    reader = m.PulsarChannelReader({"address": "pulsar://fake:6650"})
    reader.add("ch", m.EARLIEST)
    yield reader, topic, fakes[-1]
    reader.close()


def test_at_end_waits_for_a_message_the_broker_has_not_dispatched(fake_pulsar):
    reader, topic, _ = fake_pulsar
    topic.stored.append(tick(1))
    assert not reader.at_end("ch")  # read_next times out, but the broker's last message is ahead
    topic.dispatched = 1
    assert [msg.timestamp for msg in reader.read(0.05)] == [1]
    assert reader.at_end("ch")


def test_at_end_on_an_empty_topic_the_broker_refuses(fake_pulsar, monkeypatch):
    reader, topic, fake = fake_pulsar
    now = [1000.0]
    monkeypatch.setattr(m.time, "monotonic", lambda: now[0])
    assert reader.at_end("ch") and fake.asked == 1  # refused: nothing on the topic, so nothing to wait for
    topic.stored.append(tick(1))
    assert not reader.at_end("ch") and fake.asked == 1  # no promise, and no question, right after a refusal
    now[0] += reader.EMPTY_RECHECK
    assert not reader.at_end("ch") and fake.asked == 2
    topic.dispatched = 1
    assert [msg.timestamp for msg in reader.read(0.05)] == [1]
    assert reader.at_end("ch")
    fake.failure = pulsar.UnknownError("Pulsar error: UnknownError")
    assert not reader.at_end("ch")  # the channel had a message: the same refusal is not an empty topic now
    fake.failure = pulsar.ConnectError("Pulsar error: ConnectError")
    assert not reader.at_end("ch")


def test_at_end_refused_for_a_channel_started_after_a_message(fake_pulsar):
    reader, _, _ = fake_pulsar
    reader.add("ch", m.StartAt(m.StartKind.AFTER, pulsar.MessageId(0, 0, 7, -1).serialize()))
    assert not reader.at_end("ch")  # it started after a message, so the topic is not empty


@pytest.fixture(scope="module")
def own_pulsar(tmp_path_factory):
    """A pulsar-lite broker of this module's own, started as the stack starts it (no Milvus needed)."""
    from stack import Stack
    broker = Stack(tmp_path_factory.mktemp("pulsar-lite"))
    try:
        broker._start_pulsar()
        yield broker.endpoints["pulsar"]
    finally:
        broker.down()


def test_at_end_on_pulsar_lite(own_pulsar, unique_name):
    channel = unique_name("at-end")
    reader = m.PulsarChannelReader({"address": own_pulsar})
    reader.EMPTY_RECHECK = 0  # every at_end asks the broker
    client = pulsar.Client(own_pulsar, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
    try:
        reader.add(channel, m.EARLIEST)
        assert reader.at_end(channel)  # pulsar-lite refuses the last message id here: the topic is empty
        producer = client.create_producer(f"persistent://public/default/{channel}", batching_enabled=False)
        for ts in (1, 2, 3):
            producer.send(tick(ts))
        assert not reader.at_end(channel)
        read: list[int] = []
        wait_until(lambda: read.extend(msg.timestamp for msg in reader.read(0.1)) or len(read) >= 3, 10,
                   what="the three ticks read")
        assert read == [1, 2, 3]
        assert reader.at_end(channel)
        producer.send(tick(4))
        assert not reader.at_end(channel)

        # Started at the latest message, before it reads one, the client compares the broker's last message id
        # with the reader's mark-delete position, and pulsar-lite's answer shows no new message there until it is
        # dispatched to the reader: only "eventually not at the end" holds here.
        reader.add(channel, m.LATEST)
        assert reader.at_end(channel)
        producer.send(tick(5))
        wait_until(lambda: not reader.at_end(channel), 10, interval=0.05, what="the new tick seen")
        wait_until(lambda: [msg.timestamp for msg in reader.read(0.1)] == [5], 10, what="the new tick read")
        assert reader.at_end(channel)
    finally:
        reader.close()
        client.close()
