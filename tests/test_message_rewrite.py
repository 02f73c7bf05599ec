"""Unit tests of the message rewrite: source DML turned into the target's, everything else kept."""
from __future__ import annotations

from pymilvus.grpc_gen import common_pb2, msg_pb2, schema_pb2

import milvus_cdc as m

TARGET = m.TargetCollection(id=900, db_name="shop", name="orders", created_ts=5,
                            vchannels=["t-dml_3_900v0", "t-dml_7_900v1"], fields={"id": 100, "v": 101},
                            partitions={"_default": 901, "p1": 902})


def source_insert(timestamp: int = 77) -> msg_pb2.InsertRequest:
    return msg_pb2.InsertRequest(
        base=common_pb2.MsgBase(msg_type=common_pb2.Insert, msgID=4242, timestamp=timestamp, sourceID=3),
        shardName="s-dml_1_10v1", db_name="shop", collection_name="orders", partition_name="p1", collectionID=10,
        partitionID=11, segmentID=12, timestamps=[77, 77], rowIDs=[1, 2], num_rows=2,
        fields_data=[schema_pb2.FieldData(field_name="id", field_id=100, type=schema_pb2.Int64,
                                          scalars=schema_pb2.ScalarField(long_data=schema_pb2.LongArray(data=[5, 6]))),
                     schema_pb2.FieldData(field_name="v", field_id=105, type=schema_pb2.FloatVector)])


def test_insert_is_addressed_to_the_target_and_keeps_source_identity():
    out = msg_pb2.InsertRequest.FromString(m.MessageRewriter.insert(source_insert(), TARGET, 902, 1))
    assert (out.collectionID, out.partitionID, out.shardName, out.segmentID) == (900, 902, "t-dml_7_900v1", 0)
    assert [f.field_id for f in out.fields_data] == [100, 101], "field ids follow the target's schema by name"
    # What makes replays harmless and data time-correct stays the source's:
    assert out.base.msgID == 4242 and out.base.timestamp == 77 and list(out.timestamps) == [77, 77]
    assert list(out.rowIDs) == [1, 2] and list(out.fields_data[0].scalars.long_data.data) == [5, 6]


def test_delete_keeps_the_partition_wildcard_and_primary_keys():
    delete = msg_pb2.DeleteRequest(base=common_pb2.MsgBase(msg_type=common_pb2.Delete, msgID=9, timestamp=80),
                                   shardName="s-dml_1_10v0", collectionID=10, partitionID=-1, timestamps=[80],
                                   primary_keys=schema_pb2.IDs(int_id=schema_pb2.LongArray(data=[5])), num_rows=1)
    out = msg_pb2.DeleteRequest.FromString(m.MessageRewriter.delete(delete, TARGET, -1, 0))
    assert (out.collectionID, out.partitionID, out.shardName) == (900, -1, "t-dml_3_900v0")
    assert list(out.primary_keys.int_id.data) == [5] and out.base.msgID == 9


def test_drops_are_made_for_every_target_shard_with_the_source_time_and_id():
    drops = m.MessageRewriter.drop_collection(TARGET, 90, 4343)
    assert [channel for channel, _ in drops] == ["t-dml_3", "t-dml_7"], "every shard's channel stops on one"
    out = msg_pb2.DropCollectionRequest.FromString(drops[0][1])
    assert (out.collectionID, out.collectionName, out.db_name) == (900, "orders", "shop")
    assert (out.base.msg_type, out.base.timestamp, out.base.msgID) == (common_pb2.DropCollection, 90, 4343)
    parts = m.MessageRewriter.drop_partition(TARGET, "p1", 95, 4444)
    out = msg_pb2.DropPartitionRequest.FromString(parts[1][1])
    assert (out.collectionID, out.partitionID, out.partition_name, out.base.timestamp) == (900, 902, "p1", 95)


def test_time_tick():
    tick = msg_pb2.TimeTickMsg.FromString(m.MessageRewriter.time_tick(123))
    assert tick.base.msg_type == common_pb2.TimeTick and tick.base.timestamp == 123


def test_channel_names():
    assert m.shard_index("by-dev-rootcoord-dml_12_4470v10") == 10
    assert m.pchannel_of("by-dev-rootcoord-dml_12_4470v10") == "by-dev-rootcoord-dml_12"


def test_an_upsert_insert_is_timed_by_its_rows():
    """The Insert half of an upsert has base.timestamp 0: its time is the latest row time."""
    insert = source_insert(timestamp=0)
    insert.timestamps[:] = [70, 75]
    decoded = m.decode_source_message("ch", b"\0" * 8, insert.SerializeToString())
    assert (decoded.msg_type, decoded.timestamp) == (common_pb2.Insert, 75)


def test_the_reader_reads_only_the_header_of_a_data_message():
    """The applier parses a message once, fully; the reader buffers its compact bytes and reads only its time (an
    upsert's from its rows: test_an_upsert_insert_is_timed_by_its_rows)."""
    payload = source_insert().SerializeToString()
    decoded = m.decode_source_message("ch", b"\0" * 8, payload)
    assert decoded.payload == payload and decoded.timestamp == 77
