"""The bounds a CDC's rate is compared with, measured on the same stack as the CDC (tests/bench_replication.py).

READ bound: the fastest reader we have reads the source's DML records of one collection and decodes each as a
Milvus message (confluent-kafka / librdkafka, then ``common_pb2.MsgHeader`` and ``msg_pb2.InsertRequest``). For
comparison the same records are also fetched without decoding, and read through the Python CDC's own reader
(``milvus_cdc.KafkaChannelReader``, kafka-python).

WRITE bound: the same Insert messages, rewritten for a collection on the target exactly as the CDC addresses them
(``milvus_cdc.MessageRewriter``: target collection id, vchannel, partition id, field ids), are sent with
``ReplicateMessage`` as fast as the target takes them, from 1..n threads; then a time tick on every pchannel of
the collection makes them visible, and count(*) on the target (waiting for that tick) must equal the rows sent.
The target collection is made, loaded and dropped the way the CDC does it (DDL with ``replicateInfo``, ticks
through ``ReplicateMessage``), so this must never run while a CDC writes to the same target.

LAG floor: a minimal CDC forwarding one small batch at a time as soon as a source tick covers it, for the live
lag no CDC can go below on this stack.
"""
from __future__ import annotations

import struct
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_cdcs import StackMeter, check_status, count_rows, hybrid_now, milvus_stub

MB = 1e6


class Rates:
    """rows and payload_bytes over seconds."""
    rows: int
    payload_bytes: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / MB / self.seconds


@dataclass
class ReadResult(Rates):
    how: str
    rows: int
    records: int
    payload_bytes: int      # serialized Insert messages of the collection (Kafka record values, uncompressed)
    seconds: float


@dataclass
class Offsets:
    """Where the collection's records start and end on each of its source pchannels (partition 0)."""
    start: dict[str, int]
    end: dict[str, int] = field(default_factory=dict)


def end_offsets(kafka: str, topics: list[str]) -> dict[str, int]:
    from confluent_kafka import Consumer, TopicPartition
    consumer = Consumer({"bootstrap.servers": kafka, "group.id": f"bench-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    try:
        found = {}
        for topic in topics:
            try:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
            except Exception:  # noqa: BLE001 - a topic not written yet starts at 0
                high = 0
            found[topic] = max(high, 0)
        return found
    finally:
        consumer.close()


def read_confluent(kafka: str, offsets: Offsets, collection_id: int, decode: bool = True,
                   keep: list | None = None) -> ReadResult:
    """One pass over the records with confluent-kafka; ``decode`` parses every record (MsgHeader, then the
    InsertRequest of each Insert), ``keep`` collects the raw Insert messages of the collection."""
    from confluent_kafka import Consumer, TopicPartition
    from pymilvus.grpc_gen import common_pb2, msg_pb2
    header, insert_request, insert_type = common_pb2.MsgHeader.FromString, msg_pb2.InsertRequest.FromString, \
        common_pb2.Insert
    consumer = Consumer({"bootstrap.servers": kafka, "group.id": f"bench-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "fetch.max.bytes": 64 << 20,
                         "max.partition.fetch.bytes": 32 << 20, "queued.max.messages.kbytes": 128 << 10,
                         "fetch.wait.max.ms": 10, "enable.partition.eof": False})
    pending = {t: e for t, e in offsets.end.items() if e > offsets.start[t]}
    rows = records = size = 0
    started = time.monotonic()
    try:
        consumer.assign([TopicPartition(t, 0, offsets.start[t]) for t in pending])
        deadline = started + 600
        while pending and time.monotonic() < deadline:
            # consume() waits until it has num_messages or its timeout passed: a short timeout, or every call
            # would wait it out (the records are MBs each, a batch is never full).
            for message in consumer.consume(num_messages=10000, timeout=0.01):
                if message.error():
                    continue
                topic, offset = message.topic(), message.offset()
                if topic not in pending or offset >= pending[topic]:
                    continue
                if offset + 1 >= pending[topic]:
                    del pending[topic]
                records += 1
                value = message.value()
                if not decode:
                    size += len(value)
                    continue
                if header(value).base.msg_type != insert_type:
                    continue
                request = insert_request(value)
                if request.collectionID != collection_id:
                    continue
                rows += request.num_rows or len(request.timestamps)
                size += len(value)
                if keep is not None:
                    keep.append(value)
        if pending:
            raise RuntimeError(f"records of {sorted(pending)} not read within 600 s")
    finally:
        consumer.close()
    seconds = time.monotonic() - started
    return ReadResult("confluent-kafka + decode" if decode else "confluent-kafka, fetch only (no decode)",
                      rows, records, size, seconds)


def read_cdc_reader(kafka: str, offsets: Offsets, collection_id: int) -> ReadResult:
    """One pass through the Python CDC's own reader (milvus_cdc.KafkaChannelReader: kafka-python, each record
    decoded as a SourceMessage), each Insert parsed (by the reader itself in newer milvus_cdc.py, else here)."""
    from pymilvus.grpc_gen import common_pb2, msg_pb2

    import milvus_cdc
    reader = milvus_cdc.KafkaChannelReader({"address": kafka})
    pending = {t: e for t, e in offsets.end.items() if e > offsets.start[t]}
    rows = records = size = 0
    started = time.monotonic()
    try:
        for topic in pending:
            reader.add(topic, milvus_cdc.StartAt(milvus_cdc.StartKind.AT, struct.pack("<q", offsets.start[topic])))
        deadline = started + 900
        while pending and time.monotonic() < deadline:
            for message in reader.read(0.5):
                if message.channel not in pending:
                    continue
                offset = struct.unpack("<q", message.msg_id)[0]
                if offset >= pending[message.channel]:
                    continue
                if offset + 1 >= pending[message.channel]:
                    del pending[message.channel]
                records += 1
                if message.msg_type != common_pb2.Insert:
                    continue
                # Newer readers hand data messages over parsed (``parsed``, ``size``); older ones as bytes.
                request = getattr(message, "parsed", None)
                if request is None:
                    request = msg_pb2.InsertRequest.FromString(message.payload)
                if request.collectionID == collection_id:
                    rows += request.num_rows or len(request.timestamps)
                    size += getattr(message, "size", 0) or len(message.payload)
        if pending:
            raise RuntimeError(f"records of {sorted(pending)} not read within 900 s")
    finally:
        reader.close()
    return ReadResult("kafka-python + decode (the Python CDC's reader)", rows, records, size,
                      time.monotonic() - started)


# ---------------------------------------------------------------------------------------------------------
# The write bound
# ---------------------------------------------------------------------------------------------------------

def replicate_base(msg_type: int, ts: int):
    from pymilvus.grpc_gen import common_pb2
    return common_pb2.MsgBase(msg_type=msg_type, replicateInfo=common_pb2.ReplicateInfo(isReplicate=True,
                                                                                        msgTimestamp=ts))


class TargetTicker:
    """Time ticks (``hybrid now``, never going backwards) on some target pchannels, as a CDC sends them: every
    ``interval`` s in a thread while a collection is made and loaded, or one at a time with ``tick``."""

    def __init__(self, stub, pchannels: list[str], interval: float = 0.2):
        self.stub, self.pchannels, self.interval = stub, pchannels, interval
        self.last = 0
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def tick(self, ts: int | None = None) -> int:
        from pymilvus.grpc_gen import milvus_pb2

        import milvus_cdc
        ts = max(self.last + 1, ts if ts is not None else hybrid_now())
        for pchannel in self.pchannels:
            answer = self.stub.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(
                channel_name=pchannel, Msgs=[milvus_cdc.MessageRewriter.time_tick(ts)]), timeout=60)
            check_status(answer.status, f"time tick to {pchannel}")
        self.last = ts
        return ts

    def __enter__(self) -> TargetTicker:
        def run():
            while not self.stopping.wait(self.interval):
                try:
                    self.tick()
                except BaseException as exc:  # noqa: BLE001 - reported by __exit__
                    self.error = exc
                    return
        self.stopping.clear()
        self.tick()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise RuntimeError(f"time ticks failed: {self.error}")


class TargetCopy:
    """A collection made on the target by the benchmark itself, the way the CDC makes a copy: CreateCollection,
    CreateIndex and LoadCollection with ``replicateInfo``, ticks through ReplicateMessage; dropped with its drop
    messages, the DropCollection call and one more tick."""

    def __init__(self, target_uri: str, name: str, schema, shards: int):
        self.channel, self.stub = milvus_stub(target_uri)
        self.name, self.schema, self.shards = name, schema, shards
        self.target = None       # milvus_cdc.TargetCollection once made
        self.ticker: TargetTicker | None = None

    def make(self, index_field: str, timeout: float = 180.0) -> None:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2, schema_pb2

        import milvus_cdc
        schema = schema_pb2.CollectionSchema()
        schema.CopyFrom(self.schema)
        schema.name = self.name
        del schema.fields[:]
        schema.fields.extend(f for f in self.schema.fields if f.fieldID >= 100)
        created_ts = hybrid_now()
        answer = self.stub.CreateCollection(milvus_pb2.CreateCollectionRequest(
            base=replicate_base(common_pb2.CreateCollection, created_ts), collection_name=self.name,
            schema=schema.SerializeToString(), shards_num=self.shards,
            consistency_level=common_pb2.ConsistencyLevel.Eventually), timeout=60)
        check_status(answer, f"create collection {self.name} on the target")
        described = self.stub.DescribeCollection(milvus_pb2.DescribeCollectionRequest(collection_name=self.name),
                                                 timeout=60)
        check_status(described.status, f"describe {self.name} on the target")
        partitions = self.stub.ShowPartitions(milvus_pb2.ShowPartitionsRequest(collection_name=self.name),
                                              timeout=60)
        check_status(partitions.status, f"show partitions of {self.name} on the target")
        self.target = milvus_cdc.TargetCollection(
            id=described.collectionID, db_name="default", name=self.name, created_ts=described.created_timestamp,
            vchannels=sorted(described.virtual_channel_names, key=milvus_cdc.shard_index),
            fields={f.name: f.fieldID for f in described.schema.fields},
            partitions=dict(zip(partitions.partition_names, partitions.partitionIDs, strict=True)))
        self.ticker = TargetTicker(self.stub, self.target.pchannels)
        with self.ticker:
            answer = self.stub.CreateIndex(milvus_pb2.CreateIndexRequest(
                base=replicate_base(common_pb2.CreateIndex, hybrid_now()), collection_name=self.name,
                field_name=index_field, index_name=index_field, extra_params=[
                    common_pb2.KeyValuePair(key="index_type", value="FLAT"),
                    common_pb2.KeyValuePair(key="metric_type", value="L2"),
                    common_pb2.KeyValuePair(key="params", value="{}")]), timeout=60)
            check_status(answer, f"create index on {self.name} on the target")
            answer = self.stub.LoadCollection(milvus_pb2.LoadCollectionRequest(
                base=replicate_base(common_pb2.LoadCollection, hybrid_now()), collection_name=self.name,
                replica_number=1), timeout=60)
            check_status(answer, f"load {self.name} on the target")
            deadline = time.monotonic() + timeout
            while True:
                progress = self.stub.GetLoadingProgress(milvus_pb2.GetLoadingProgressRequest(
                    collection_name=self.name), timeout=30)
                check_status(progress.status, f"loading progress of {self.name}")
                if progress.progress >= 100:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not loaded on the target within {timeout:.0f} s")
                time.sleep(0.2)

    def drop(self) -> None:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2

        import milvus_cdc
        if self.target is None:
            self.channel.close()
            return
        ts = self.ticker.tick() + 1
        for pchannel, message in milvus_cdc.MessageRewriter.drop_collection(self.target, ts, ts):
            answer = self.stub.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(channel_name=pchannel,
                                                                                   Msgs=[message]), timeout=60)
            check_status(answer.status, f"drop message of {self.name} to {pchannel}")
        answer = self.stub.DropCollection(milvus_pb2.DropCollectionRequest(
            base=replicate_base(common_pb2.DropCollection, ts), collection_name=self.name), timeout=60)
        check_status(answer, f"drop {self.name} on the target")
        self.ticker.tick(ts + 1)
        self.target = None
        self.channel.close()


@dataclass
class WriteResult(Rates):
    concurrency: int
    rows: int
    requests: int
    payload_bytes: int
    send_seconds: float        # every ReplicateMessage answered
    visible_seconds: float     # ... and the closing tick consumed: count(*) waiting for it returned
    count: int
    tick_each: bool = False    # a tick after each request (one thread per pchannel) instead of one at the end
    stack_pct: dict | None = None  # % of a core each stack process used from the first request to the count

    @property
    def seconds(self) -> float:
        """Rates count until every row is visible on the target."""
        return self.visible_seconds

    @property
    def send_rows_per_s(self) -> float:
        return self.rows / self.send_seconds


def build_requests(copy: TargetCopy, payloads: list[bytes], request_bytes: int) -> tuple[list, int, int, int]:
    """ReplicateMessage requests carrying ``payloads`` (source Insert messages) rewritten for the target copy.

    Like the CDC: collection id, vchannel of the same shard, partition id by name, field ids by name, the
    target assigns segments; messages of one pchannel are packed up to ``request_bytes`` a request. Timestamps
    (and msgIDs) are moved past the copy's last tick so the target consumes them. Returns the requests, each
    with the highest timestamp it carries (round-robin over pchannels), rows, payload bytes and the highest
    timestamp of all. Each rewritten message goes straight into its request: one copy of the data, not two."""
    from pymilvus.grpc_gen import milvus_pb2, msg_pb2

    import milvus_cdc
    target = copy.target
    partition_id = target.partitions["_default"]
    by_channel: dict[str, list[list]] = {p: [] for p in target.pchannels}   # [request, bytes, highest ts]
    ts = copy.ticker.last + 1
    rows = size = 0
    for payload in payloads:
        msg = msg_pb2.InsertRequest.FromString(payload)
        shard = milvus_cdc.shard_index(msg.shardName)
        ts += 1
        msg.base.timestamp = ts
        msg.base.msgID = ts
        msg.timestamps[:] = [ts] * len(msg.timestamps)
        rows += msg.num_rows or len(msg.timestamps)
        data = milvus_cdc.MessageRewriter.insert(msg, target, partition_id, shard)
        del msg
        size += len(data)
        pchannel = target.pchannels[shard]
        chunks = by_channel[pchannel]
        if not chunks or (chunks[-1][1] and chunks[-1][1] + len(data) > request_bytes):
            chunks.append([milvus_pb2.ReplicateMessageRequest(channel_name=pchannel), 0, 0, ts])
        chunks[-1][0].Msgs.append(data)
        chunks[-1][1] += len(data)
        chunks[-1][2] = ts
        del data
    requests = []
    while any(by_channel.values()):
        for chunks in by_channel.values():
            if chunks:
                request, _, request_ts, first_ts = chunks.pop(0)
                requests.append((request, request_ts, first_ts))
    return requests, rows, size, ts


def write_bound(target_uri: str, schema, shards: int, payloads: list[bytes], concurrency: int,
                request_bytes: int = 16 << 20, index_field: str = "v", tick_each: bool = False,
                before_drop: Callable[[], object] | None = None, meter: StackMeter | None = None) -> WriteResult:
    """Make a fresh copy collection, send ``payloads`` to it with ``concurrency`` threads, tick, count.

    With ``tick_each`` one thread per pchannel sends its requests in order, each followed by a tick at the
    request's highest timestamp (what a CDC does: the target consumes while later data is sent); otherwise the
    requests go out from ``concurrency`` threads in any order, and every 0.2 s a tick covers every timestamp below
    the oldest request not yet answered (as the Python CDC ticks: one tick window of a million rows stalls the
    target), and a last one covers them all. With ``meter``, the stack's CPU from the first request to the count goes
    into ``stack_pct``."""
    copy = TargetCopy(target_uri, f"bench_write_c{concurrency}_{uuid.uuid4().hex[:8]}", schema, shards)
    try:
        copy.make(index_field)
        requests, rows, size, last_ts = build_requests(copy, payloads, request_bytes)
        request_count = len(requests)
        stub = copy.stub

        def send(request):
            answer = stub.ReplicateMessage(request, timeout=300)
            check_status(answer.status, f"ReplicateMessage to {request.channel_name}")

        def send_channel(pchannel):
            tick = milvus_cdc_tick()
            for request, request_ts, _ in requests:
                if request.channel_name == pchannel:
                    send(request)
                    answer = stub.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(
                        channel_name=pchannel, Msgs=[tick(request_ts)]), timeout=60)
                    check_status(answer.status, f"time tick to {pchannel}")

        unanswered = {first_ts for _, _, first_ts in requests}
        lock, sending = threading.Lock(), threading.Event()

        def send_one(request, first_ts):
            send(request)
            with lock:
                unanswered.discard(first_ts)

        def tick_answered():
            while not sending.wait(0.2):
                with lock:
                    below = min(unanswered, default=last_ts + 1) - 1
                if below > copy.ticker.last:
                    copy.ticker.tick(below)

        from pymilvus.grpc_gen import milvus_pb2
        mark = meter.start() if meter is not None else None
        started = time.monotonic()
        if tick_each:
            concurrency = len(copy.target.pchannels)
            with ThreadPoolExecutor(concurrency) as pool:
                for done in [pool.submit(send_channel, p) for p in copy.target.pchannels]:
                    done.result()
        else:
            with ThreadPoolExecutor(concurrency + 1) as pool:
                ticking = pool.submit(tick_answered)
                try:
                    for done in [pool.submit(send_one, r, first_ts) for r, _, first_ts in requests]:
                        done.result()
                finally:
                    sending.set()
                    ticking.result()
        sent = time.monotonic() - started
        tick = copy.ticker.tick(last_ts + 1)
        # Ticks go on while the count waits, as a CDC's do: Milvus 2.3.5 may hold a channel's last message back
        # until another one arrives (seen here: count(*) waiting on the last tick for minutes, answered at
        # once after one more tick).
        with copy.ticker:
            count = count_rows(stub, copy.name, guarantee_ts=tick, timeout=180)
        visible = time.monotonic() - started
        stack_pct = meter.since(mark) if meter is not None else None
        return WriteResult(concurrency, rows, request_count, size, sent, visible, count, tick_each, stack_pct)
    finally:
        if before_drop is not None:
            # Milvus 2.3.5's datanode can panic ("send on closed channel" in FlushSegments) when a collection is
            # dropped while the segments it just filled are being flushed.
            before_drop()
        copy.drop()


def milvus_cdc_tick():
    import milvus_cdc
    return milvus_cdc.MessageRewriter.time_tick


# ---------------------------------------------------------------------------------------------------------
# The lag floor: what the quickest possible CDC would show as live lag
# ---------------------------------------------------------------------------------------------------------

@dataclass
class FloorSample:
    source_tick_s: float    # insert returned -> its data and a source time tick >= its timestamp read on every pchannel
    target_s: float         # -> data and that tick sent with ReplicateMessage, and count(*) counting the rows
    total_s: float


def lag_floor(kafka: str, target_uri: str, writer, described, first_id: int, batches: int = 20,
              batch: int = 100, interval: float = 0.25) -> list[FloorSample]:
    """A minimal CDC on one collection, one batch at a time: insert ``batch`` rows on the source; read the
    collection's pchannels (confluent-kafka) until its Insert messages and a source time tick at or past the
    write's timestamp are read on every pchannel; forward the messages (rewritten, source timestamps kept) and
    that tick with ReplicateMessage; wait for count(*) on the target to count them. Nothing is batched, nothing
    checkpointed: the live lag no CDC reading the same source can go below (the source ticks every 200 ms)."""
    from confluent_kafka import Consumer, TopicPartition
    from pymilvus.grpc_gen import common_pb2, milvus_pb2, msg_pb2

    import milvus_cdc
    pchannels = sorted(described.physical_channel_names)
    copy = TargetCopy(target_uri, f"bench_floor_{uuid.uuid4().hex[:8]}", described.schema, len(pchannels))
    consumer = Consumer({"bootstrap.servers": kafka, "group.id": f"bench-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 5, "fetch.min.bytes": 1,
                         "enable.partition.eof": False})
    samples = []
    try:
        copy.make("v")
        target = copy.target
        partition_id = target.partitions["_default"]
        starts = end_offsets(kafka, pchannels)
        consumer.assign([TopicPartition(p, 0, starts[p]) for p in pchannels])
        counted_rows = 0
        for k in range(batches):
            time.sleep(interval)
            ts = writer.insert(writer.request(first_id + k * batch, batch))
            returned = time.monotonic()
            ticked: dict[str, int] = {}
            data: dict[str, list[bytes]] = {p: [] for p in target.pchannels}
            while len(ticked) < len(pchannels):
                if time.monotonic() - returned > 60:
                    raise RuntimeError("no source time tick past the write within 60 s")
                for message in consumer.consume(num_messages=1000, timeout=0.005):
                    if message.error():
                        continue
                    value, pchannel = message.value(), message.topic()
                    base = common_pb2.MsgHeader.FromString(value).base
                    if base.msg_type == common_pb2.TimeTick and base.timestamp >= ts:
                        ticked.setdefault(pchannel, base.timestamp)
                    elif base.msg_type == common_pb2.Insert and pchannel not in ticked:
                        msg = msg_pb2.InsertRequest.FromString(value)
                        if msg.collectionID == described.collectionID:
                            shard = milvus_cdc.shard_index(msg.shardName)
                            data[target.pchannels[shard]].append(
                                milvus_cdc.MessageRewriter.insert(msg, target, partition_id, shard))
                            counted_rows += msg.num_rows or len(msg.timestamps)
            read = time.monotonic()
            for pchannel, messages in data.items():
                if messages:
                    answer = copy.stub.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(
                        channel_name=pchannel, Msgs=messages), timeout=60)
                    check_status(answer.status, f"ReplicateMessage to {pchannel}")
            copy.ticker.tick(min(ticked.values()))
            counted = count_rows(copy.stub, copy.name, guarantee_ts=ts)
            while counted < counted_rows:     # see live lag: 2.3.5 may answer a few ms early
                time.sleep(0.002)
                counted = count_rows(copy.stub, copy.name)
            done = time.monotonic()
            samples.append(FloorSample(read - returned, done - read, done - returned))
        return samples
    finally:
        consumer.close()
        copy.drop()
