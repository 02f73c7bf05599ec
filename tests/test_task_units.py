"""Unit tests of the task's small value types and bookkeeping (fakes stand in for the servers here)."""
from __future__ import annotations

from pymilvus.grpc_gen import common_pb2

import milvus_cdc as m


def message(channel, offset, ts, kind=common_pb2.Insert):
    return m.SourceMessage(channel, offset.to_bytes(8, "little"), kind, ts, b"")


def test_resume_point_is_the_first_unapplied_message_not_the_last_tick():
    """A tick T may come after a message above T: resuming after that tick would skip the message."""
    progress = m.ChannelProgress("dml_0", is_replicate=False)
    progress.last_read = m.StartAt("after", (12).to_bytes(8, "little"))
    progress.pending = [message("dml_0", 10, 500), message("dml_0", 11, 510)]
    assert progress.checkpoint(400) == m.Checkpoint("dml_0", (10).to_bytes(8, "little"), 400, "at")
    progress.pending = []
    assert progress.checkpoint(600) == m.Checkpoint("dml_0", (12).to_bytes(8, "little"), 600, "after")
    assert m.ChannelProgress("new", False).checkpoint(1) is None


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
