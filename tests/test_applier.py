"""Unit tests of the applier's handlers, through its ApplierContext: fakes stand in for the source's etcd, the
target (its mirror and outbox), the target's clock and the reader thread; no server is needed."""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from types import SimpleNamespace

from pymilvus.grpc_gen import common_pb2, milvus_pb2, msg_pb2, schema_pb2

import milvus_cdc as m

SCHEMA = schema_pb2.CollectionSchema(name="c", fields=[
    schema_pb2.FieldSchema(fieldID=100, name="pk", data_type=schema_pb2.Int64, is_primary_key=True),
    schema_pb2.FieldSchema(fieldID=101, name="v", data_type=schema_pb2.FloatVector)])
SOURCE = m.SourceCollection(
    id=10, name="c", db_id=1, db_name="shop", schema=SCHEMA, shards_num=1, consistency_level=0, properties=[],
    vchannels=["src-dml_0_10v0"], pchannels=["src-dml_0"], start_positions={"src-dml_0": b"\x01"}, create_time=50,
    state=m.COLLECTION_CREATED)
PARTITIONS = [m.SourcePartition(11, "_default", 10, 50, m.PARTITION_CREATED),
              m.SourcePartition(12, "p1", 10, 60, m.PARTITION_CREATED)]


class FakeMeta:
    """The source's etcd as the applier reads it: one collection, its partitions, its load state."""

    def __init__(self):
        self.loaded: m.SourceLoad | None = None

    def collection(self, collection_id):
        return SOURCE if collection_id == SOURCE.id else None

    def collections(self, revision=None):
        return [SOURCE]

    def partitions(self, collection_id=None, revision=None, since=0):
        return list(PARTITIONS) if collection_id in (None, SOURCE.id) else []

    def load_state(self, collection_id):
        return self.loaded

    def indexes(self, source, dropped=False):
        return [m.SourceIndex("v", "v_idx", (("index_type", "FLAT"),), 55)]


class FakeMirror:
    """The target as the applier's steps change it, every call noted in ``events`` (shared with the outbox, so
    that the order of messages and calls shows)."""

    def __init__(self, events):
        self.events = events
        self.collections: dict[tuple[str, str], m.TargetCollection] = {}

    def base(self, msg_type, ts):
        return common_pb2.MsgBase(msg_type=msg_type, timestamp=ts)

    def collection(self, db_name, name, fresh=False):
        return self.collections.get((db_name, name))

    def create_database(self, db_name, ts):
        self.events.append(("create database", db_name, ts))

    def create_collection(self, request):
        self.events.append(("create collection", f"{request.db_name}.{request.collection_name}",
                            request.base.timestamp))
        schema = schema_pb2.CollectionSchema.FromString(request.schema)
        created = m.TargetCollection(900, request.db_name, request.collection_name, request.base.timestamp,
                                     ["tgt-dml_3_900v0"], {f.name: f.fieldID + 1000 for f in schema.fields},
                                     {"_default": 901})
        self.collections[(request.db_name, request.collection_name)] = created
        return created

    def ensure_partition(self, target, name, ts):
        self.events.append(("create partition", name, ts))
        target.partitions[name] = 900 + len(target.partitions) + 1
        return target.partitions[name]

    def drop_collection(self, target, ts, messages, outbox=None):
        self.events.append(("drop collection", target.qualified_name, ts, [p for p, _ in messages]))
        self.collections.pop((target.db_name, target.name), None)

    def drop_partition(self, target, name, ts, outbox, messages):
        dropped = [msg_pb2.DropPartitionRequest.FromString(message) for _, message in messages]
        self.events.append(("drop partition", name, ts, [(d.partitionID, d.base.msgID) for d in dropped]))
        target.partitions.pop(name, None)

    def set_load(self, target, wanted, ts, create_indexes):
        self.events.append(("set load", target.qualified_name, wanted, ts))


class FakeOutbox:
    def __init__(self, events):
        self.events, self.size = events, 0

    def add(self, pchannel, message, reorderable=False):
        self.events.append(("message", pchannel, message, reorderable))

    def flush(self):
        self.events.append(("flush",))

    def send(self):
        return []  # no call out: the round is acknowledged at once


class FakeClock:
    def __init__(self):
        self.channels, self.advanced = set(), []

    def add_channels(self, pchannels):
        self.channels.update(pchannels)

    def advance(self, task_id):
        self.advanced.append(task_id)

    def wait_ticked(self, ts, timeout):
        self.advanced.append(("ticked", ts))
        return True


class FakeMetrics:
    def __init__(self):
        self.rows = []
        self.stages: list[tuple[m.Stage, int]] = []

    def replicated(self, collection, op, rows, size):
        self.rows.append((collection, op, rows))

    def reached(self, stage, ts):
        self.stages.append((stage, ts))


def make_applier():
    events: list = []
    asked: list = []
    source = m.SourceSettings(etcd=m.EtcdSettings(("127.0.0.1:2379",)), root_path="by-dev", meta_sub_path="meta",
                              default_partition_name="_default", read_chan_len=8,
                              replicate_chan="by-dev-replicate", mq_type=m.MqType.KAFKA)
    ctx = m.ApplierContext(
        task=m.TaskInfo("t1", m.ConnectParam("http://target:19530"), [{"name": "*"}]), source=source,
        replication=m.ReplicationSettings(), retry=m.RetryPolicy(max_backoff=0.01), meta=FakeMeta(),
        writer=SimpleNamespace(call_timeout=1.0),
        mirror=FakeMirror(events), outbox=FakeOutbox(events), clock=FakeClock(), metrics=FakeMetrics(),
        stop=threading.Event(), waits=m.Waits(), reads=queue.Queue(), catalog_reads=queue.Queue(),
        load_checkpoints=dict, save_checkpoints=lambda checkpoints: events.append(("checkpoints", checkpoints)),
        patience=lambda role: None, ask_reader=lambda *command: asked.append(command),
        start_reading=lambda reader, generations, poller: None, open_reader=lambda: None, failed=lambda: False,
        checkpoint=m.CheckpointRecord())
    return m.Applier(ctx), ctx, events, asked


def message(msg_type, ts, request, channel="src-dml_0"):
    return m.SourceMessage(channel, ts.to_bytes(8, "big"), msg_type, ts, request.SerializeToString())


def insert(ts, partition=("_default", 11)):
    return message(common_pb2.Insert, ts, msg_pb2.InsertRequest(
        base=common_pb2.MsgBase(msg_type=common_pb2.Insert, msgID=ts, timestamp=ts), shardName="src-dml_0_10v0",
        db_name="shop", collection_name="c", partition_name=partition[0], collectionID=10, partitionID=partition[1],
        timestamps=[ts, ts], rowIDs=[1, 2], num_rows=2,
        fields_data=[schema_pb2.FieldData(
            field_name="pk", field_id=100, type=schema_pb2.Int64,
            scalars=schema_pb2.ScalarField(long_data=schema_pb2.LongArray(data=[5, 6])))]))


def sent(events):
    return [e for e in events if e[0] == "message"]


def test_an_insert_makes_the_copy_follows_its_channel_and_goes_to_the_copys_shard():
    applier, ctx, events, asked = make_applier()
    applier.on_insert(insert(100))
    assert events[:3] == [("create database", "shop", 50), ("create collection", "shop.c", 50),
                          ("create partition", "p1", 60)], "the copy is made as the source made it, at its times"
    assert asked == [(m.ReaderCommand.ADD, "src-dml_0", m.StartAt("at", b"\x01"), 1)], \
        "its channel is read from the collection's start position, through the reader thread"
    assert ctx.clock.channels == {"tgt-dml_3"}, "the copy's channels are ticked"
    [(_, pchannel, payload, reorderable)] = sent(events)
    out = msg_pb2.InsertRequest.FromString(payload)
    assert (pchannel, reorderable) == ("tgt-dml_3", True)
    assert (out.collectionID, out.partitionID, out.shardName) == (900, 901, "tgt-dml_3_900v0")
    assert [f.field_id for f in out.fields_data] == [1100], "field ids are the target's"
    assert ctx.metrics.rows == [("shop.c", "insert", 2)]

    applier.on_insert(insert(110, ("p1", 12)))
    assert [e[:2] for e in events[4:]] == [("message", "tgt-dml_3")], "the copy is made once"
    assert msg_pb2.InsertRequest.FromString(sent(events)[1][2]).partitionID == 902
    assert len(asked) == 1


def test_an_insert_into_a_partition_the_copy_lacks_makes_it_first():
    applier, ctx, events, asked = make_applier()
    applier.on_insert(insert(100))
    ctx.mirror.collections[("shop", "c")].partitions.pop("p1")  # as if the source made it after the copy
    applier.on_insert(insert(110, ("p1", 12)))
    assert [e[:2] for e in events[-2:]] == [("create partition", "p1"), ("message", "tgt-dml_3")]


def test_a_delete_goes_to_the_copy_with_the_partition_wildcard_kept():
    applier, ctx, events, asked = make_applier()
    applier.on_insert(insert(100))
    applier.on_delete(message(common_pb2.Delete, 120, msg_pb2.DeleteRequest(
        base=common_pb2.MsgBase(msg_type=common_pb2.Delete, msgID=120, timestamp=120), shardName="src-dml_0_10v0",
        collectionID=10, partitionID=-1, timestamps=[120], num_rows=1,
        primary_keys=schema_pb2.IDs(int_id=schema_pb2.LongArray(data=[5])))))
    _, pchannel, payload, reorderable = sent(events)[-1]
    out = msg_pb2.DeleteRequest.FromString(payload)
    assert (pchannel, reorderable) == ("tgt-dml_3", True)
    assert (out.collectionID, out.partitionID, out.shardName) == (900, -1, "tgt-dml_3_900v0")
    assert list(out.primary_keys.int_id.data) == [5]
    assert ctx.metrics.rows[-1] == ("shop.c", "delete", 1)


def test_a_delete_of_a_collection_out_of_scope_is_dropped():
    applier, ctx, events, asked = make_applier()
    applier.on_delete(message(common_pb2.Delete, 120, msg_pb2.DeleteRequest(
        base=common_pb2.MsgBase(msg_type=common_pb2.Delete, timestamp=120), shardName="src-dml_0_77v0",
        collectionID=77, partitionID=-1, timestamps=[120], num_rows=1)))
    assert events == [] and asked == []


def drop_collection(ts, channel="src-dml_0"):
    return message(common_pb2.DropCollection, ts, msg_pb2.DropCollectionRequest(
        base=common_pb2.MsgBase(msg_type=common_pb2.DropCollection, msgID=4242, timestamp=ts), db_name="shop",
        collectionName="c", collectionID=10), channel)


def test_a_drop_collection_drops_the_copy_once_and_stops_reading_its_channel():
    applier, ctx, events, asked = make_applier()
    applier.on_insert(insert(100))
    applier.on_drop_collection(drop_collection(200))
    assert events[-1] == ("drop collection", "shop.c", 200, ["tgt-dml_3"])
    assert asked[-1] == (m.ReaderCommand.REMOVE, "src-dml_0", None, 0), "no collection left on the channel"
    assert not applier.order.has_input("src-dml_0")
    applier.on_drop_collection(drop_collection(200))  # the same drop, as another shard carries it
    applier.on_insert(insert(210))                    # late data of the dropped collection
    assert events[-1][0] == "drop collection" and len(asked) == 2, "nothing more is done to a dropped copy"


def drop_partition(ts, name="p1", source_id=12):
    return message(common_pb2.DropPartition, ts, msg_pb2.DropPartitionRequest(
        base=common_pb2.MsgBase(msg_type=common_pb2.DropPartition, msgID=77, timestamp=ts), db_name="shop",
        collection_name="c", partition_name=name, collectionID=10, partitionID=source_id))


def test_a_drop_partition_drops_the_copys_partition_once():
    applier, ctx, events, asked = make_applier()
    applier.on_insert(insert(100, ("p1", 12)))
    target_partition = msg_pb2.InsertRequest.FromString(sent(events)[-1][2]).partitionID
    applier.on_drop_partition(drop_partition(150))
    assert events[-1] == ("drop partition", "p1", 150, [(target_partition, 77)]), \
        "the drop message carries the target's partition id and the source's msgID"
    applier.on_drop_partition(drop_partition(150))  # a replay
    assert events[-1][:2] == ("drop partition", "p1") and len([e for e in events if e[0] == "drop partition"]) == 1
    assert asked[-1][0] == m.ReaderCommand.ADD, "the collection's channel is still read"


def test_a_drop_partition_of_an_older_incarnation_leaves_the_newer_one():
    applier, ctx, events, asked = make_applier()
    applier.on_insert(insert(100, ("p1", 12)))
    applier.on_drop_partition(drop_partition(150, source_id=7))  # the drop of an earlier partition "p1"
    assert not [e for e in events if e[0] == "drop partition"]


def load(msg_type, request, ts):
    request.base.CopyFrom(common_pb2.MsgBase(msg_type=msg_type, timestamp=ts))
    return message(msg_type, ts, request, channel="by-dev-replicate")


def test_a_load_and_a_release_bring_the_copy_to_the_sources_load_state_after_the_data_before_them():
    applier, ctx, events, asked = make_applier()
    applier.on_insert(insert(100))
    ctx.meta.loaded = m.SourceLoad(m.LOAD_TYPE_COLLECTION, 2, frozenset({11, 12}))
    applier.on_load(load(common_pb2.LoadCollection, milvus_pb2.LoadCollectionRequest(
        db_name="shop", collection_name="c", replica_number=2), 300))
    wanted = m.WantedLoad(whole=True, replicas=2, partitions=frozenset({"_default", "p1"}), partition_key=False)
    assert events[-2:] == [("flush",), ("set load", "shop.c", wanted, 300)]
    assert events.index(("flush",)) > events.index(sent(events)[-1]), "the data before the load goes first"

    ctx.meta.loaded = None
    applier.on_load(load(common_pb2.ReleaseCollection, milvus_pb2.ReleaseCollectionRequest(
        db_name="shop", collection_name="c"), 400))
    assert events[-2:] == [("flush",), ("set load", "shop.c", None, 400)]


def test_a_load_of_a_collection_the_task_does_not_know_by_that_name_does_nothing():
    applier, ctx, events, asked = make_applier()
    applier.on_insert(insert(100))
    before = list(events)
    applier.on_load(load(common_pb2.LoadCollection, milvus_pb2.LoadCollectionRequest(
        db_name="shop", collection_name="other", replica_number=1), 300))
    applier.on_load(load(common_pb2.LoadCollection, milvus_pb2.LoadCollectionRequest(
        db_name="shop", collection_name="c", replica_number=1), 40))  # before the collection was made
    assert events == before


def test_the_replicator_hands_the_applier_its_reader_and_its_checkpoints():
    """The seam: the context's reader commands reach the reader thread's queue, and checkpoints go to the
    meta store under the task's id and fence."""
    saved = []
    store = SimpleNamespace(save_checkpoints=lambda task_id, checkpoints, fence: saved.append((task_id, fence)),
                            load_checkpoints=lambda task_id: {"ch": task_id})
    source = m.SourceSettings(etcd=m.EtcdSettings(("127.0.0.1:2379",)), root_path="by-dev", meta_sub_path="meta",
                              default_partition_name="_default", read_chan_len=8,
                              replicate_chan="by-dev-replicate", mq_type=m.MqType.KAFKA)
    config = SimpleNamespace(source=source, replication=m.ReplicationSettings())
    fence = (m.Lease("target", "s1", 1, 0.0), "target:19530")
    replicator = m.Replicator(m.TaskInfo("t1", m.ConnectParam("http://target:19530"), [{"name": "*"}]), config,
                              store, SimpleNamespace(), lambda r, reason: None, FakeMetrics(), fence=fence,
                              catalog_feed=SimpleNamespace(), retry=m.RetryPolicy(max_backoff=0.01))
    ctx = replicator._applier_context(FakeMeta(), SimpleNamespace(call_timeout=1.0))
    ctx.ask_reader(m.ReaderCommand.ADD, "src-dml_0", m.LATEST, 3)
    assert replicator.reader_commands.get_nowait() == (m.ReaderCommand.ADD, "src-dml_0", m.LATEST, 3)
    assert ctx.load_checkpoints() == {"ch": "t1"}
    ctx.save_checkpoints([])
    assert saved == [("t1", fence)]
    assert ctx.reads is replicator.read_queue and ctx.stop is replicator.stop_event


def test_a_checkpoint_stored_is_the_tasks_durable_time_for_every_one_who_asks():
    """Issue 18, item 3: the durable time lived in the applier, the order, the clock and the task's status. The
    CheckpointRecord holds it; the applier tells it once the meta store took the checkpoint, and only then is the
    target's clock told to tick."""
    applier, ctx, events, asked = make_applier()
    applier.on_insert(insert(100))
    applier.order.promise("src-dml_0", 150, b"\x09")
    applier.order.commit([], 150)
    applier.checkpoint_dirty = True
    assert applier._save_checkpoint(now=True)
    [checkpoint] = events[-1][1]
    assert (checkpoint.channel, checkpoint.msg_id, checkpoint.timestamp) == ("src-dml_0", b"\x09", 150)
    assert applier.durable == ctx.checkpoint.ts == 150 and ctx.checkpoint.at > 0
    assert ctx.checkpoint.shown() == ({"src-dml_0": 150}, [])
    assert ctx.clock.advanced == ["t1"]

    def store_down(checkpoints):
        raise m.MetaStoreUnavailable("store away")
    applier.ctx = dataclasses.replace(ctx, save_checkpoints=store_down)
    applier.order.commit([], 180)
    applier.checkpoint_dirty = True
    assert not applier._save_checkpoint(now=True)
    assert applier.durable == 150 and ctx.clock.advanced == ["t1"], "not stored: neither durable nor ticked"
    [wait] = ctx.waits.snapshot()
    assert "store away" in wait.last_error


def caught_up_applier():
    """An applier past its start, following src-dml_0 and the replicate channel, checkpoints every minute."""
    applier, ctx, events, asked = make_applier()
    applier.ctx = ctx = dataclasses.replace(ctx, replication=m.ReplicationSettings(checkpoint_interval=60.0))
    applier.order.add_input(m.CATALOG_INPUT, m.InputKind.CATALOG)
    applier._read("src-dml_0", m.StartAt(m.StartKind.AT, b"\x01"))
    applier._read("by-dev-replicate", m.StartAt(m.StartKind.AT, b"\x01"))
    applier.last_checkpoint = time.monotonic()
    return applier, ctx, events


def promise_all(ctx, ts):
    ctx.reads.put(m.ReadBatch({"src-dml_0": 1, "by-dev-replicate": 1}, [
        m.SourceMessage("src-dml_0", ts.to_bytes(8, "big"), common_pb2.TimeTick, ts, b""),
        m.SourceMessage("by-dev-replicate", b"", common_pb2.TimeTick, ts, b"")]))
    ctx.catalog_reads.put((ts, []))


def test_a_caught_up_task_stores_its_checkpoint_and_ticks_the_target_at_once():
    """Issue 20: with checkpointInterval as the only pace, rows waited up to an interval after the target took
    them before the tick that makes them visible. A task with nothing else to do checkpoints at once."""
    applier, ctx, events = caught_up_applier()
    promise_all(ctx, 200)
    applier._step()   # the watermark moves to 200, the round is acknowledged, nothing read waits: stored now
    assert [[c.timestamp for c in e[1]] for e in events if e[0] == "checkpoints"] == [[200, 200]]
    assert applier.durable == 200 and ctx.clock.advanced == ["t1"]
    assert [stage for stage, ts in ctx.metrics.stages if ts == 200] == [
        m.Stage.OPERATIONS_PROMISED, m.Stage.CATALOG_PROMISED, m.Stage.ORDERED, m.Stage.SENT,
        m.Stage.ACKNOWLEDGED, m.Stage.CHECKPOINTED], "each stage is told when it moves"


def test_a_busy_task_stores_its_checkpoint_once_per_interval():
    applier, ctx, events = caught_up_applier()
    for ts in (200, 400, 600):
        promise_all(ctx, ts)  # more is read after each step: the task is not caught up
    applier._step()
    applier._step()
    assert not [e for e in events if e[0] == "checkpoints"] and applier.durable == 0
    applier.last_checkpoint -= 60
    promise_all(ctx, 800)
    applier._step()
    assert applier.durable == 600, "stored once the interval is over"
    applier._step()
    assert applier.durable == 800, "caught up again: stored at once"


def test_an_idle_applier_sleeps_until_something_wakes_it():
    """Issue 20: the applier looked at its queues 20 times a second whatever came. It sleeps now until the
    reader hands it a batch, or the catalog thread, a call's answer or a stop wakes it."""
    applier, ctx, events = caught_up_applier()
    applier.ctx = ctx = dataclasses.replace(ctx, wake=lambda: ctx.reads.put_nowait(m.ReadBatch({}, [])))
    applier.IDLE_WAIT = 60.0
    ctx.catalog_reads.put((300, []))
    receiving = threading.Thread(target=applier._receive, daemon=True)
    receiving.start()
    receiving.join(0.3)
    assert receiving.is_alive(), "nothing in the read queue: it sleeps"
    ctx.wake()
    receiving.join(5)
    assert not receiving.is_alive() and applier.catalog_fence == 300, "woken, it takes the catalog's promise"


def test_a_stopping_applier_has_the_target_ticked_to_its_last_checkpoint():
    applier, ctx, events, asked = make_applier()
    applier.order.commit([], 150)
    applier.checkpoint_dirty = True
    assert applier._save_checkpoint(force=True)
    assert ctx.clock.advanced == [], "at stop the checkpoint is stored first"
    applier._last_tick()
    assert ctx.clock.advanced == ["t1", ("ticked", 150)]


class FakeReader:
    """A channel reader with nothing to read, noting which thread adds and removes its channels."""

    def __init__(self):
        self.commands, self.closed = [], False

    def add(self, channel, start):
        self.commands.append(("add", channel, threading.current_thread().name))
        return start

    def remove(self, channel):
        self.commands.append(("remove", channel, threading.current_thread().name))

    def read(self, timeout):
        threading.Event().wait(0.01)
        return []

    def at_end(self, channel):
        return False

    def transient(self, error):
        return False

    def close(self):
        self.closed = True


def test_the_replicator_owns_the_reader_and_catalog_threads_the_applier_asks_for():
    source = m.SourceSettings(etcd=m.EtcdSettings(("127.0.0.1:2379",)), root_path="by-dev", meta_sub_path="meta",
                              default_partition_name="_default", read_chan_len=8,
                              replicate_chan="by-dev-replicate", mq_type=m.MqType.KAFKA)
    config = SimpleNamespace(source=source, replication=m.ReplicationSettings())
    feed = SimpleNamespace(poll_after=lambda asked, timeout: threading.Event().wait(0.05) or None, error="")
    replicator = m.Replicator(m.TaskInfo("t1abcdefgh", m.ConnectParam("http://target:19530"), [{"name": "*"}]),
                              config, SimpleNamespace(), SimpleNamespace(), lambda r, reason: None, FakeMetrics(),
                              catalog_feed=feed, retry=m.RetryPolicy(max_backoff=0.01))
    ctx = replicator._applier_context(FakeMeta(), SimpleNamespace(call_timeout=1.0))
    reader, meta_closed = FakeReader(), threading.Event()
    poller = SimpleNamespace(meta=SimpleNamespace(close=meta_closed.set))
    ctx.start_reading(reader, {}, poller)
    assert replicator.started.is_set()
    assert sorted(t.name for t in replicator.threads) == ["cdc-catalog-t1abcdef", "cdc-read-t1abcdef"]
    ctx.ask_reader(m.ReaderCommand.ADD, "src-dml_0", m.LATEST, 1)
    ctx.ask_reader(m.ReaderCommand.REMOVE, "src-dml_0", None, 0)
    pause = threading.Event()
    for _ in range(200):
        if len(reader.commands) == 2:
            break
        pause.wait(0.01)
    assert reader.commands == [("add", "src-dml_0", "cdc-read-t1abcdef"), ("remove", "src-dml_0", "cdc-read-t1abcdef")]
    pause.wait(m.Replicator.CATALOG_IDLE + 0.2)  # the catalog thread waits on the feed by now
    assert replicator.stop(5), "the task's threads end when it stops"
    assert reader.closed and meta_closed.is_set() and not replicator.failed
