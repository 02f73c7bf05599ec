"""Unit tests of the task's small value types and bookkeeping (fakes stand in for the servers here)."""
from __future__ import annotations

import milvus_cdc as m


def test_checkpoint_json_round_trip():
    checkpoint = m.Checkpoint("by-dev-rootcoord-dml_3", b"\x00\x01\xff", 470672960302874626, "at")
    assert m.Checkpoint.from_json(checkpoint.to_json()) == checkpoint


class RecordingWriter:
    def __init__(self):
        self.sent = []

    def replicate(self, pchannel, messages):
        from pymilvus.grpc_gen import msg_pb2
        self.sent += [(pchannel, msg_pb2.TimeTickMsg.FromString(x).base.timestamp) for x in messages]


def test_target_ticks_follow_the_slowest_task_and_never_go_back():
    clock, writer = m.TargetClock(), RecordingWriter()
    clock.add_channels(["a", "b"])
    clock.join("t1", 100)
    clock.join("t2", 50)
    clock.advance("t1", 200, writer)
    assert writer.sent == [("a", 50), ("b", 50)], "ticks wait for the task that is behind"
    clock.advance("t2", 300, writer)
    assert writer.sent[2:] == [("a", 200), ("b", 200)]
    clock.leave("t1")
    clock.join("t3", 10)   # a task joining late does not pull the channels back
    clock.advance("t2", 400, writer)
    assert writer.sent[4:] == []
    clock.leave("t3")
    clock.advance("t2", 400, writer)
    assert writer.sent[4:] == [("a", 400), ("b", 400)]


def test_collection_filter():
    every = m.CollectionFilter(["*"])
    named = m.CollectionFilter(["books", "shop.orders"])
    assert every.matches("any", "thing") and named.matches("default", "books") and named.matches("shop", "orders")
    assert not named.matches("shop", "books") and not named.matches("default", "orders")
    assert every.overlaps(named) and named.overlaps(m.CollectionFilter(["default.books"]))
    assert not named.overlaps(m.CollectionFilter(["other"]))


def test_task_info_hides_the_token_from_the_public_view_and_keeps_it_stored():
    task = m.TaskInfo("t1", m.ConnectParam("http://h:19530", token="root:secret"), [{"name": "*"}])
    assert "secret" not in str(task.public())
    assert m.TaskInfo.from_store(task.to_store()).connect.token == "root:secret"
