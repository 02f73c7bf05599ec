"""The MQ readers on the stack's real Kafka-compatible broker: the server's shared tail (KafkaTail) and the
tasks' readers on it (SharedKafkaReader). Each test writes its own topics, as Milvus writes a channel: one
MsgHeader-framed record per message."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from pymilvus.grpc_gen import common_pb2

import milvus_cdc as m

from helpers import wait_until


@pytest.fixture
def kafka(stack):
    settings = {"address": stack["kafka"]}
    tail = m.KafkaTail(settings)
    try:
        yield settings, tail
    finally:
        tail.close()


def write(address: str, topic: str, first: int, count: int) -> None:
    """Records whose timestamps are first..first+count-1, so that what a reader got names what it missed. One
    record a request, as Milvus writes (Tansu's end offset is the last batch's first offset + 1)."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=address)
    try:
        for ts in range(first, first + count):
            producer.send(topic, common_pb2.MsgHeader(base=common_pb2.MsgBase(
                msg_type=common_pb2.TimeTick, timestamp=ts)).SerializeToString(), partition=0)
            producer.flush()
    finally:
        producer.close()


def read_until(reader: m.ChannelReader, channel: str, last: int, got: list[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while (not got or got[-1] < last) and time.monotonic() < deadline:
        got += [msg.timestamp for msg in reader.read(0.2) if msg.channel == channel]
    return got


def topic() -> str:
    return f"cdc-test-{uuid.uuid4().hex[:10]}"


def test_readers_of_one_channel_share_the_tail_once_at_its_end_and_miss_nothing(kafka):
    settings, tail = kafka
    channel = topic()
    write(settings["address"], channel, 1, 500)
    ahead, behind = m.SharedKafkaReader(settings, tail), m.SharedKafkaReader(settings, tail)
    try:
        ahead.add(channel, m.EARLIEST)
        assert read_until(ahead, channel, 500, []) == list(range(1, 501))
        wait_until(lambda: ahead.own is None and ahead.at_end(channel), 10, 0.1,
                   "the reader to hand its channel to the tail once at its end, and drop its own consumer")
        write(settings["address"], channel, 501, 100)
        assert read_until(ahead, channel, 600, []) == list(range(501, 601)), "delivered by the tail"
        # a second reader from the start: behind the tail, so it catches up on its own, then joins the tail,
        # which reads again from where it joined (the first reader skips what it had)
        behind.add(channel, m.EARLIEST)
        got_behind = read_until(behind, channel, 600, [])
        write(settings["address"], channel, 601, 100)
        assert read_until(behind, channel, 700, got_behind) == list(range(1, 701))
        assert read_until(ahead, channel, 700, []) == list(range(601, 701)), "nothing again, nothing missed"
        wait_until(lambda: behind.own is None, 10, 0.1, "the second reader on the tail too")
        assert ahead.at_end(channel) and behind.at_end(channel)
        assert list(tail.followers[channel]) == [ahead, behind]
    finally:
        ahead.close()
        behind.close()
    assert channel not in tail.followers


def test_a_reader_that_does_not_take_what_the_tail_gives_reads_on_by_itself(kafka, monkeypatch):
    settings, tail = kafka
    channel = topic()
    write(settings["address"], channel, 1, 10)
    slow, quick = m.SharedKafkaReader(settings, tail), m.SharedKafkaReader(settings, tail)
    monkeypatch.setattr(m.SharedKafkaReader, "INBOX_BYTES", 200)
    try:
        for reader in (slow, quick):
            reader.add(channel, m.EARLIEST)
            read_until(reader, channel, 10, [])
            wait_until(lambda r=reader: r.own is None, 10, 0.1, "on the tail")
        got: list[int] = []
        for first in range(11, 311, 20):  # in rounds, as a live channel comes; the slow reader does not read
            write(settings["address"], channel, first, 20)
            read_until(quick, channel, first + 19, got)
        assert got == list(range(11, 311)), "the quick one is not held"
        wait_until(lambda: channel in slow.handed_back, 10, 0.1, "the slow reader's channel handed back")
        assert not slow.at_end(channel), "not at the end while it is handed back"
        assert read_until(slow, channel, 310, []) == list(range(11, 311)), "from where the tail stopped, by itself"
    finally:
        slow.close()
        quick.close()


def test_a_channel_removed_and_added_again_gets_nothing_of_its_first_life(kafka):
    settings, tail = kafka
    channel = topic()
    write(settings["address"], channel, 1, 20)
    reader = m.SharedKafkaReader(settings, tail)
    try:
        reader.add(channel, m.EARLIEST)
        read_until(reader, channel, 20, [])
        wait_until(lambda: reader.own is None, 10, 0.1, "on the tail")
        write(settings["address"], channel, 21, 20)
        wait_until(lambda: len(reader.inbox) == 20, 10, 0.05, "delivered, not read yet")
        reader.remove(channel)
        assert not reader.inbox and not reader.at_end(channel)
        start = reader.add(channel, m.LATEST)
        write(settings["address"], channel, 41, 5)
        assert read_until(reader, channel, 45, []) == [41, 42, 43, 44, 45], start
    finally:
        reader.close()


def test_the_end_offset_is_asked_once_for_the_callers_waiting_on_it(kafka, monkeypatch):
    """One question at a time; a caller is answered by a question that began after it asked."""
    settings, tail = kafka
    channel = topic()
    write(settings["address"], channel, 1, 3)
    assert tail.end_offset(channel) == 3
    write(settings["address"], channel, 4, 2)
    assert tail.end_offset(channel) == 5, "never an answer from before the call"


class HeldPolls:
    """A consumer of one channel holding offsets 0..99 whose polls wait until the test lets each one go."""

    def __init__(self, channel: str):
        from kafka import TopicPartition
        self.partition = TopicPartition(channel, 0)
        self.assigned: list = []
        self.at = 0
        self.polling, self.go = threading.Event(), threading.Event()

    def assignment(self):
        return set(self.assigned)

    def assign(self, partitions):
        self.assigned = list(partitions)

    def position(self, partition):
        return self.at

    def seek(self, partition, offset):
        self.at = offset

    def poll(self, timeout_ms, max_records):
        from types import SimpleNamespace
        self.polling.set()
        if not self.go.wait(1):
            return {}
        self.go.clear()
        records = [SimpleNamespace(offset=o, value=common_pb2.MsgHeader(base=common_pb2.MsgBase(
            msg_type=common_pb2.TimeTick, timestamp=o)).SerializeToString()) for o in range(self.at, 100)]
        self.at = 100
        return {self.partition: records} if records else {}

    def close(self):
        pass


def test_a_reader_joining_behind_the_tail_gets_nothing_before_the_tail_went_back_for_it():
    """Joined while a poll is out: what that poll brings lies past the joiner's offset; given to it, the joiner
    would skip the records between (read again after the seek, they are below its next offset)."""
    channel = topic()
    consumer = HeldPolls(channel)
    tail = m.KafkaTail({"address": "unused:9092"}, consumer=lambda: consumer)
    ahead, behind = m.SharedKafkaReader({}, tail), m.SharedKafkaReader({}, tail)
    try:
        ahead.shared[channel] = ahead.returned[channel] = 50
        tail.join(ahead, channel, 50)
        assert consumer.polling.wait(5)
        consumer.polling.clear()
        consumer.go.set()  # 50..99 to the first reader
        wait_until(lambda: ahead.shared[channel] == 100, 5, 0.01, "the first reader at 100")
        assert consumer.polling.wait(5)  # the next poll is out
        behind.shared[channel] = behind.returned[channel] = 20
        tail.join(behind, channel, 20)
        consumer.at = 100 - 5  # that poll brings 95..99 (as if written meanwhile)
        consumer.polling.clear()
        consumer.go.set()
        assert consumer.polling.wait(5)  # the tail went back to 20 for the joiner before this poll
        consumer.polling.clear()
        consumer.go.set()
        wait_until(lambda: behind.shared[channel] == 100, 5, 0.01, "the joiner at 100")
        assert [msg.timestamp for msg in behind.read(0)] == list(range(20, 100))
        assert [msg.timestamp for msg in ahead.read(0)] == list(range(50, 100)), "nothing twice"
    finally:
        tail.close()
