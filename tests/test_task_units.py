"""Unit tests of the task's small value types and bookkeeping (fakes stand in for the servers here)."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from types import SimpleNamespace

import pytest

import milvus_cdc as m


def test_checkpoint_json_round_trip():
    checkpoint = m.Checkpoint("by-dev-rootcoord-dml_3", b"\x00\x01\xff", 470672960302874626, m.StartKind.AT)
    assert m.Checkpoint.from_json(checkpoint.to_json()) == checkpoint
    assert m.Checkpoint.from_json(checkpoint.to_json()).resume is m.StartKind.AT
    behind = m.Checkpoint("by-dev-replicate", b"\x07", 470672960302874626, m.StartKind.AT, (b"\x08", b"\x0a"))
    assert m.Checkpoint.from_json(behind.to_json()) == behind
    assert m.Checkpoint.from_json({k: v for k, v in checkpoint.to_json().items() if k != "applied"}) == checkpoint


def test_a_stored_checkpoint_keeps_the_words_of_its_resume_kind():
    """StartKind is an enum in the code; the stored document (read by earlier versions too) keeps "at"/"after",
    and a document without "resume" (the oldest) resumes after its message."""
    stored = m.Checkpoint("ch", b"\x01", 5, m.StartKind.AFTER).to_json()
    assert stored["resume"] == "after" and type(stored["resume"]) is str
    assert json.loads(json.dumps(m.Checkpoint("ch", b"\x01", 5, m.StartKind.AT).to_json()))["resume"] == "at"
    del stored["resume"]
    assert m.Checkpoint.from_json(stored).resume is m.StartKind.AFTER


class RecordingWriter:
    def __init__(self):
        self.sent = []

    def replicate(self, pchannel, messages):
        from pymilvus.grpc_gen import msg_pb2
        self.sent += [(pchannel, msg_pb2.TimeTickMsg.FromString(x).base.timestamp) for x in messages]

    def close(self):
        pass


def test_target_ticks_follow_the_slowest_task_and_never_go_back():
    import time
    writer = RecordingWriter()
    clock = m.TargetClock(m.RetryPolicy(), "t:1", make_writer=lambda param, patience, fence: writer)
    param = m.ConnectParam("http://t:1")

    def settled(expected):
        deadline = time.monotonic() + 5
        while writer.sent != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.sent == expected
    durable = {"t1": 100, "t2": 50, "t3": 10}  # what each task's CheckpointRecord answers

    def advance(task_id, ts):
        durable[task_id] = ts
        clock.advance(task_id)
    try:
        clock.join("t1", lambda: durable["t1"], param)
        clock.join("t2", lambda: durable["t2"], param)
        clock.add_channels(["a", "b"])  # nothing to tick before: both tasks have joined
        settled([("a", 50), ("b", 50)])  # ticks wait for the task that is behind
        advance("t1", 200)
        advance("t2", 300)
        settled([("a", 50), ("b", 50), ("a", 200), ("b", 200)])
        clock.leave("t1")
        clock.join("t3", lambda: durable["t3"], param)   # a task joining late does not pull the channels back
        advance("t2", 400)
        time.sleep(0.2)
        settled([("a", 50), ("b", 50), ("a", 200), ("b", 200)])
        clock.leave("t3")
        settled([("a", 50), ("b", 50), ("a", 200), ("b", 200), ("a", 400), ("b", 400)])
    finally:
        clock.close()


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


class ScriptedWriter:
    """A target writer that answers each call from a script: a status to refuse with, or success. Its refusals
    are ones the real writer hands back at once (clear, or explained by a repair of the call), not retried."""

    metrics = None

    def __init__(self, answers: dict[str, list]):
        self.answers, self.calls = answers, []

    def call(self, op, method, request, db_name="", ok_if=None, transient_if=None, explained_if=None):
        from pymilvus.grpc_gen import common_pb2
        self.calls.append(method)
        answer = self.answers.get(method, []).pop(0) if self.answers.get(method) else None
        if answer is None:
            return common_pb2.Status()
        status = common_pb2.Status(code=65535, reason=answer)
        if ok_if is not None and ok_if(status):
            return status
        assert m.clear_refusal(status) or (explained_if is not None and explained_if(status)), \
            f"the real writer would retry {answer!r}, not refuse it at once"
        raise m.TargetRefusal(op, status)

    @staticmethod
    def base(msg_type, ts):
        return m.TargetWriter.base(msg_type, ts)


def test_a_refusal_the_history_explains_is_repaired_then_the_call_is_made_again():
    writer = ScriptedWriter({"DropPartition": [
        "partition cannot be dropped, partition is loaded, please release it first"]})
    mirror = m.TargetMirror(writer, "t1")
    target = m.TargetCollection(7, "default", "c", 1, ["ch_1_7v0"], {}, {"_default": 1, "p": 2})
    mirror.drop_partition(target, "p", 100, m.Outbox(writer, "t1"), [])
    assert writer.calls == ["DropPartition", "ReleasePartitions", "DropPartition"]
    assert "p" not in target.partitions


def test_a_refusal_nothing_explains_halts_with_the_operation_object_and_answer():
    writer = ScriptedWriter({"DropPartition": ["partition cannot be dropped, partition is loaded",
                                               "partition cannot be dropped, partition is loaded"]})
    mirror = m.TargetMirror(writer, "t1")
    target = m.TargetCollection(7, "shop", "c", 1, ["ch_1_7v0"], {}, {"_default": 1, "p": 2})
    try:
        mirror.drop_partition(target, "p", 100, m.Outbox(writer, "t1"), [])
    except m.TaskHalt as halt:
        assert str(halt) == "drop partition shop.c/p: code 65535: partition cannot be dropped, partition is loaded"
    else:
        raise AssertionError("a second refusal after the repair must halt the task")
    assert writer.calls == ["DropPartition", "ReleasePartitions", "DropPartition"], "each repair is tried once"


def test_index_calls_behind_a_later_index_of_the_same_name_are_skipped():
    """create vec (IVF), drop vec, create vec (FLAT), load: a load read from etcd ahead of the replicate channel
    makes the source's current index (FLAT, created at 300) first; the older create and drop must not touch it."""
    writer = ScriptedWriter({})
    mirror = m.TargetMirror(writer, "t1")
    target = m.TargetCollection(7, "default", "c", 1, ["ch_1_7v0"], {}, {"_default": 1})
    mirror.create_index(target, "vec", "vec", [("index_type", "FLAT")], 300, unwanted=lambda name: False)
    mirror.create_index(target, "vec", "vec", [("index_type", "IVF_FLAT")], 100, unwanted=lambda name: False)
    mirror.drop_index(target, "vec", "vec", 200)
    assert writer.calls == ["CreateIndex"]
    mirror.create_index(target, "vec", "vec", [("index_type", "FLAT")], 300, unwanted=lambda name: False)
    mirror.drop_index(target, "vec", "vec", 400)
    mirror.create_index(target, "vec", "vec", [("index_type", "HNSW")], 500, unwanted=lambda name: False)
    assert writer.calls == ["CreateIndex", "CreateIndex", "DropIndex", "CreateIndex"], "later calls go through"


def test_transient_and_refusing_answers_are_told_apart():
    from pymilvus.grpc_gen import common_pb2
    assert 8 in m.TRANSIENT_CODES and common_pb2.RateLimit in m.TRANSIENT_ERROR_CODES  # rate limit
    assert 1 in m.TRANSIENT_CODES  # not ready
    assert 65535 not in m.TRANSIENT_CODES and 100 not in m.TRANSIENT_CODES  # refusals: unexpected, not found
    assert "UNAVAILABLE" in m.TRANSIENT_GRPC and "UNAUTHENTICATED" not in m.TRANSIENT_GRPC


class SlowWriter:
    """Records what each channel received, in order; one channel can be made to fail."""

    def __init__(self, failing: str = ""):
        import threading
        self.got, self.failing, self.lock = [], failing, threading.Lock()

    def replicate(self, pchannel, messages):
        import time
        time.sleep(0.01)
        if pchannel == self.failing:
            raise m.TaskHalt(f"replicate to {pchannel}: refused")
        with self.lock:
            self.got += [(pchannel, x) for x in messages]


def test_send_lanes_keep_each_channels_order_and_raise_a_failure():
    writer = SlowWriter()
    outbox = m.Outbox(writer, "t1")
    futures = []
    for i in range(20):
        outbox.add(f"ch{i % 3}", b"%d" % i)
        futures += outbox.send()
    outbox.flush()
    assert all(f.done() for f in futures)
    for channel in ("ch0", "ch1", "ch2"):
        assert [x for c, x in writer.got if c == channel] == [b"%d" % i for i in range(20) if f"ch{i % 3}" == channel]
    outbox.close()
    failing = m.Outbox(SlowWriter(failing="bad"), "t2")
    failing.add("bad", b"1")
    failing.add("good", b"2")
    first = failing.send()
    failing.add("bad", b"3")
    try:
        failing.flush()
    except m.TaskHalt as halt:
        assert "refused" in str(halt)
    else:
        raise AssertionError("a lane's failure must reach the applier")
    assert first[0].exception() is not None
    failing.close()


class OverlapWriter:
    """Counts the calls out at once on each channel and notes what each call carried, in the order they ended."""

    def __init__(self):
        import threading
        self.lock, self.out, self.most, self.ended = threading.Lock(), {}, {}, []

    def replicate(self, pchannel, messages):
        import time
        with self.lock:
            self.out[pchannel] = self.out.get(pchannel, 0) + 1
            self.most[pchannel] = max(self.most.get(pchannel, 0), self.out[pchannel])
            overlapping = self.out[pchannel]
        time.sleep(0.02)
        with self.lock:
            self.out[pchannel] -= 1
            self.ended.append((pchannel, tuple(messages), overlapping))


def test_inserts_overlap_on_a_channel_and_other_messages_go_alone(monkeypatch):
    monkeypatch.setattr(m.SendLane, "MERGE_BYTES", 1)  # one batch a call
    writer = OverlapWriter()
    outbox = m.Outbox(writer, "t1", calls_per_channel=3)
    futures = []
    for i in range(12):
        outbox.add("ch", b"i%d" % i, reorderable=True)
        futures += outbox.send()
    outbox.add("ch", b"drop")               # a drop message: nothing in flight around it
    futures += outbox.send()
    for i in range(3):
        outbox.add("ch", b"j%d" % i, reorderable=True)
        futures += outbox.send()
    outbox.flush()
    assert all(f.done() and f.exception() is None for f in futures)
    assert writer.most["ch"] > 1, "inserts are sent several calls at a time"
    assert writer.most["ch"] <= 3, "never more calls than calls_per_channel"
    calls = [messages for _, messages, _ in writer.ended]
    drop = next(i for i, messages in enumerate(calls) if b"drop" in messages)
    _, messages, overlapping = writer.ended[drop]
    assert overlapping == 1, "the drop message was alone on the channel"
    before = {x for c in calls[:drop] for x in c} | set(messages)
    assert {b"i%d" % i for i in range(12)} <= before, "every insert given before the drop was answered before it"
    assert messages == (b"drop",)
    assert all(not x.startswith(b"j") for c in calls[:drop] for x in c), "nothing given after the drop overtook it"
    outbox.close()


def test_flush_waits_for_every_call_out_not_only_the_last(monkeypatch):
    import time

    class FirstSlow:
        def __init__(self):
            self.answered = []

        def replicate(self, pchannel, messages):
            time.sleep(0.3 if messages == [b"first"] else 0.01)
            self.answered.append(messages[0])

    monkeypatch.setattr(m.SendLane, "MERGE_BYTES", 1)
    writer = FirstSlow()
    outbox = m.Outbox(writer, "t1", calls_per_channel=2)
    outbox.add("ch", b"first", reorderable=True)
    outbox.send()
    outbox.add("ch", b"second", reorderable=True)
    outbox.flush()
    assert sorted(writer.answered) == [b"first", b"second"], "flush returned while a call was still out"
    outbox.close()


def test_closing_the_outbox_waits_for_the_calls_still_out():
    """A task that stops (pause, hand-over) must not leave a ReplicateMessage out: it could land after the next run
    re-sent the same messages (issue 17, item 4). The call is held open by an event, not by a sleep."""
    import threading

    class HeldWriter:
        def __init__(self):
            self.entered, self.release, self.done = threading.Event(), threading.Event(), threading.Event()

        def replicate(self, pchannel, messages):
            self.entered.set()
            self.release.wait(10)
            self.done.set()

    writer = HeldWriter()
    outbox = m.Outbox(writer, "t1")
    outbox.add("ch", b"1", reorderable=True)
    outbox.send()
    assert writer.entered.wait(5)
    assert outbox.close(timeout=0.2) is False, "close reports the call still out when the wait runs out"
    threading.Timer(0.1, writer.release.set).start()
    assert outbox.close(timeout=5) is True and writer.done.is_set(), "close returned before the call ended"


def test_a_stopping_task_waits_for_its_last_tick_on_every_channel():
    """A Milvus 2.3 datanode follows a new collection's channel only once a tick passes its creation, and no
    other new collection until then: a task that stops right after it made a copy ticks it before it leaves."""
    writer = RecordingWriter()
    clock = m.TargetClock(m.RetryPolicy(), "t:1", make_writer=lambda param, patience, fence: writer)
    durable = {"t1": 50}
    try:
        clock.join("t1", lambda: durable["t1"], m.ConnectParam("http://t:1"))
        clock.add_channels(["a", "b"])
        assert clock.wait_ticked(50, 5)
        assert not clock.wait_ticked(100, 0.2), "a tick above the durable checkpoint never goes out"
        durable["t1"] = 100
        clock.advance("t1")
        assert clock.wait_ticked(100, 5) and {("a", 100), ("b", 100)} <= set(writer.sent)
        clock.hold_with(m.Lease("s1", "s1/x", 10, time.monotonic() - 60))  # a lease run out: no tick will go
        durable["t1"] = 200
        clock.advance("t1")
        started = time.monotonic()
        assert not clock.wait_ticked(200, 5) and time.monotonic() - started < 1, "no wait for what cannot come"
    finally:
        clock.close()


def test_the_ticker_survives_any_failure_and_shows_it_until_ticks_go_out_again():
    """A writer that cannot be made (a TLS file rotated away) used to end the tick thread silently: the target's
    data then stopped becoming visible with nothing in get (issue 17, item 6)."""
    import time
    writer = RecordingWriter()
    broken = {"left": 2}

    def make_writer(param, patience, fence):
        if broken["left"]:
            broken["left"] -= 1
            raise m.TlsFileError("ca_pem_path")
        return writer
    clock = m.TargetClock(m.RetryPolicy(max_backoff=0.2), "t:1", make_writer=make_writer)
    try:
        clock.join("t1", lambda: 100, m.ConnectParam("http://t:1"))
        clock.add_channels(["a"])
        deadline = time.monotonic() + 5
        while not clock.waits.snapshot() and time.monotonic() < deadline:
            time.sleep(0.01)
        [wait] = clock.waits.snapshot()
        assert "ticks" in wait.operation and "ca_pem_path" in wait.last_error
        while writer.sent != [("a", 100)] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.sent == [("a", 100)] and clock.thread.is_alive()
        assert clock.waits.snapshot() == [], "the fault is no longer shown once ticks go out"
    finally:
        clock.close()


def test_readyz_names_a_target_without_ticks_for_longer_than_retry_timeout(tmp_path):
    import dataclasses
    import time
    from pathlib import Path
    config, _ = m.load_config(str(Path(__file__).resolve().parent.parent / "config.yaml"))
    config = dataclasses.replace(config, replication=m.ReplicationSettings(retry_timeout=5))
    manager = m.TaskManager(config, m.SqliteMetaStore(str(tmp_path / "meta.db"), "cdc"))
    clock = manager.clocks["t:1"] = m.TargetClock(manager.retry, "t:1")
    assert manager.readiness() is None
    clock.waits.set("ticker", m.Wait("sending time ticks to t:1", time.time() - 1, 3, "TlsFileError: ca"))
    assert manager.readiness() is None, "a fault shorter than retryTimeout is being waited out"
    clock.waits.set("ticker", m.Wait("sending time ticks to t:1", time.time() - 6, 9, "TlsFileError: ca"))
    assert "sending time ticks to t:1" in manager.readiness() and "TlsFileError" in manager.readiness()
    manager.store.close()


def test_a_collection_read_after_its_database_was_dropped_keeps_the_database_name():
    """create database d0; create d0.c2; ...; drop d0.c2; drop database d0, fired back to back: the catalog's poll
    can read d0.c2 only after d0 is gone, with no name for its database. The database's drop must still find its
    copy as d0.c2 (the open model-based failure of issue 17, item 15, seed 1097918520)."""
    import dataclasses
    from pymilvus.grpc_gen import schema_pb2
    catalog = m.SourceCatalog(None, m.CollectionFilter(["*"]))
    c2 = m.SourceCollection(id=7, name="c2", db_id=5, db_name="d0", schema=schema_pb2.CollectionSchema(),
                            shards_num=1, consistency_level=0, properties=[], vchannels=["ch_7v0"], pchannels=["ch"],
                            start_positions={}, create_time=100, state=0)
    catalog.learn(c2)
    catalog.learn(dataclasses.replace(c2, db_name=f"{m.UNKNOWN_DB}5", state=m.COLLECTION_DROPPING))
    assert catalog.created_at("d0", "c2", 100) is not None and catalog.get(7).dropped


def test_every_try_of_a_tick_checks_the_lease():
    """A tick refused for now (rate limit) is tried again after a backoff; if this server lost the target meanwhile
    (a stall past the lease), the retry must not go out: another server ticks the target now (issue 17, item 7)."""
    import time
    from pymilvus.grpc_gen import common_pb2, milvus_pb2
    lease = m.Lease("s1", "s1/x", ttl=30, renewed_at=time.monotonic())
    calls = []

    class RateLimitedStub:
        def ReplicateMessage(self, request, timeout=None, metadata=None):
            calls.append(request.channel_name)
            lease.renewed_at = -1e9  # the server stalls past its lease while the backoff runs
            return milvus_pb2.ReplicateMessageResponse(status=common_pb2.Status(code=8, reason="rate limited"))

    def make_writer(param, patience, fence):
        writer = m.TargetWriter(param, patience, fence=fence)
        writer.stub = RateLimitedStub()
        return writer
    clock = m.TargetClock(m.RetryPolicy(max_backoff=0.2), "127.0.0.1:9", make_writer=make_writer)
    clock.hold_with(lease)
    try:
        clock.join("t1", lambda: 100, m.ConnectParam("http://127.0.0.1:9"))
        clock.add_channels(["a"])
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            time.sleep(0.1)
        assert calls == ["a"], "a tick went out again after the lease ran out"
    finally:
        clock.close()


class AnsweringStub:
    """A target's gRPC stub answering each method from a script of statuses (None: success), its last answer
    forever. At every call it notes what `get` would show of the task's waits at that moment."""

    def __init__(self, answers, waits):
        self.answers, self.waits, self.calls, self.shown = answers, waits, [], []

    def __getattr__(self, method):
        from pymilvus.grpc_gen import common_pb2, milvus_pb2

        def answer(request, timeout=None, metadata=None):
            self.calls.append(method)
            self.shown.append([w.public() for w in self.waits.snapshot()])
            script = self.answers.get(method, [None])
            status = script.pop(0) if len(script) > 1 else script[0]
            status = status or common_pb2.Status()
            return milvus_pb2.ShowPartitionsResponse(status=status) if method == "ShowPartitions" else status
        return answer


def answering_mirror(answers, retry_timeout):
    """A mirror whose writer is the real TargetWriter (its classification and its patience), over AnsweringStub."""
    import threading
    waits, metrics = m.Waits(), m.Metrics()
    patience = m.Patience(m.RetryPolicy(timeout=retry_timeout, max_backoff=0.2), threading.Event(), waits, "applier",
                          "t1")
    writer = m.TargetWriter(m.ConnectParam("http://127.0.0.1:9"), patience, metrics.task("t1"))
    writer.stub = AnsweringStub(answers, waits)
    return m.TargetMirror(writer, "t1"), writer.stub, metrics


SETTLING = "unrecoverable error: failed to load collection: node not found[node=3]"


def settling_answer():
    from pymilvus.grpc_gen import common_pb2
    return common_pb2.Status(code=65535, error_code=common_pb2.UnexpectedError, reason=SETTLING)


def load_whole(mirror):
    target = m.TargetCollection(7, "shop", "c", 1, ["ch_1_7v0"], {}, {"_default": 1})
    mirror.set_load(target, m.WantedLoad(whole=True, replicas=1, partitions=frozenset({"_default"})), 100,
                    create_indexes=lambda: None)


def test_a_target_settling_after_a_restart_is_waited_out_and_shown_meanwhile():
    """Right after a target restarts, its LoadCollection answers code 65535 "unrecoverable error" (a node not
    registered yet): no refusal of the request, so it is retried, shown in get and counted, not a pause
    (issue 17, item 14)."""
    mirror, stub, metrics = answering_mirror({"LoadCollection": [settling_answer(), settling_answer(), None]},
                                             retry_timeout=30)
    load_whole(mirror)  # a TaskHalt here fails the test
    assert stub.calls == ["ShowPartitions", "LoadCollection", "LoadCollection", "LoadCollection"]
    [wait] = stub.shown[-1]
    assert wait["operation"] == "load collection shop.c" and wait["tries"] == 2 and "node not found" in \
        wait["last_error"], "get showed the wait while the target settled"
    assert metrics.registry.get_sample_value("milvus_cdc_target_retries_total", {
        "task_id": "t1", "operation": "LoadCollection", "code": "65535"}) == 2


def test_a_target_that_never_settles_halts_the_task_after_retry_timeout():
    import time
    mirror, stub, _ = answering_mirror({"LoadCollection": [settling_answer()]}, retry_timeout=0.8)
    started = time.monotonic()
    try:
        load_whole(mirror)
    except m.TaskHalt as halt:
        reason = str(halt)
    else:
        raise AssertionError("an answer that never changes must halt the task in the end")
    assert time.monotonic() - started >= 0.8, "halted before retryTimeout"
    assert stub.calls.count("LoadCollection") > 2
    assert "load collection shop.c" in reason and SETTLING in reason, reason  # the operation, object and answer


def test_clear_refusals_halt_at_once_and_any_other_answer_is_retried():
    """Only an answer that says what is wrong with the request is final at once; a settling target's answers
    (even those that say "not found" of a node, or mention the collection) are retried."""
    import time
    from pymilvus.grpc_gen import common_pb2
    clear = [common_pb2.Status(code=1100, error_code=common_pb2.IllegalArgument,
                               reason="invalid parameter[expected=1][actual=3]"),
             common_pb2.Status(code=100, error_code=common_pb2.CollectionNotExists,
                               reason="collection not found[collection=c]"),
             common_pb2.Status(error_code=common_pb2.IllegalArgument, reason="load request refused"),
             common_pb2.Status(code=65535, error_code=common_pb2.UnexpectedError,
                               reason="create duplicate collection with different parameters, collection: c"),
             common_pb2.Status(code=65535, error_code=common_pb2.UnexpectedError, reason="database:d1 not found"),
             common_pb2.Status(code=1900, error_code=common_pb2.UnexpectedError,
                               reason="deny to use the replicate message in the normal instance")]
    for answer in clear:
        mirror, stub, metrics = answering_mirror({"LoadCollection": [answer]}, retry_timeout=30)
        started = time.monotonic()
        try:
            load_whole(mirror)
        except m.TaskHalt as halt:
            assert str(halt) == f"load collection shop.c: {m.status_text(answer)}"
        else:
            raise AssertionError(f"{answer.reason} must halt the task")
        assert stub.calls.count("LoadCollection") == 1 and time.monotonic() - started < 1, answer.reason
        assert stub.shown[-1] == [] and metrics.registry.get_sample_value("milvus_cdc_target_failures_total", {
            "task_id": "t1", "operation": "LoadCollection", "code": str(answer.code or answer.error_code)}) == 1
    unsettled = ["failed to load collection: node not found[node=3]", "index node not found",
                 "channel checkpoint is not ready", "find no available querynode"]
    for reason in unsettled:
        mirror, stub, _ = answering_mirror({"LoadCollection": [
            common_pb2.Status(code=65535, error_code=common_pb2.UnexpectedError, reason=reason), None]}, 30)
        load_whole(mirror)
        assert stub.calls.count("LoadCollection") == 2, reason


def test_a_component_not_found_is_not_taken_for_a_replay_already_done():
    """A settling target's "node not found" to a release or a drop index is not "the object is gone": it is
    retried like any unclassified answer, while a real "collection not found" still means done."""
    from types import SimpleNamespace
    settling = SimpleNamespace(reason="unrecoverable error", detail="node not found[node=3]", code=65535)
    gone = SimpleNamespace(reason="collection not found[collection=c1]", detail="", code=100)
    assert not m.answer_says(settling, *m.NOT_FOUND) and not m.answer_says(settling, *m.NOT_FOUND, "not loaded")
    assert m.answer_says(gone, *m.NOT_FOUND)
    assert m.answer_says(SimpleNamespace(reason="index not exist", detail="", code=65535), *m.NOT_FOUND)
    assert m.answer_says(SimpleNamespace(reason="database:d1 not found", detail="", code=65535), *m.NOT_FOUND)


def test_with_no_tick_the_source_clock_follows_the_source_not_this_host(monkeypatch):
    """Issue 17, item 5: with no DML tick for a second, the replicate channel and the catalog promised this host's
    time less a second; a host whose clock runs ahead of the source's promised times the source had not reached,
    and a new collection's first inserts fell below what was applied. The stand-in is the source's own TSO."""
    from pymilvus.client.utils import hybridts_to_unixtime
    real_time = time.time
    source_now = real_time()
    monkeypatch.setattr(m.time, "time", lambda: real_time() + 60)  # this host runs a minute ahead
    clock = m.SourceClock()
    clock.saw_source_time(source_now - 0.5, time.monotonic())
    assert clock.now() == 0 or hybridts_to_unixtime(clock.now()) <= real_time()
    time.sleep(m.SourceClock.FALLBACK_AFTER + 0.2)
    promised = hybridts_to_unixtime(clock.now())
    assert promised <= real_time(), f"promised {promised - real_time():.1f}s past the source's clock"
    assert promised >= real_time() - 2, "the stand-in follows the source's clock closely"
    clock.saw_tick(m.hybrid_now())  # ticks again (this host's time here): the tick rules
    assert clock.now() == clock.tick


def test_a_load_whose_index_the_source_dropped_since_is_skipped_not_halted():
    """Issue 17, item 13: a load refused "index not found" read the source's indexes as they are now; after the
    source dropped its index (which it can only do once released) there was nothing to create and the task
    halted. The load is undone by the source's own history: it is skipped, and the release that follows stays
    the last word."""
    from types import SimpleNamespace
    from pymilvus.grpc_gen import common_pb2
    refused = common_pb2.Status(code=65535, reason="index not found[collection=c]")
    mirror, stub, _ = answering_mirror({"LoadCollection": [refused]}, retry_timeout=30)
    copies = object.__new__(m.TargetCopies)  # only what the repair reads: the source's indexes now
    copies.meta = SimpleNamespace(indexes=lambda source: [])
    source = SimpleNamespace(qualified_name="shop.c")
    target = m.TargetCollection(7, "shop", "c", 1, ["ch_1_7v0"], {}, {"_default": 1})
    mirror.set_load(target, m.WantedLoad(whole=True, replicas=1, partitions=frozenset({"_default"})), 100,
                    create_indexes=lambda: copies.indexes_for_load(source, target))  # a TaskHalt fails the test
    assert stub.calls == ["ShowPartitions", "LoadCollection"], "skipped: not tried again, nothing else done"
    assert target.id not in mirror.load_kinds, "the mirror does not take the copy for loaded"


class FakeCatalog:
    """A source catalog that changes at every read of its revision: one collection more each time."""

    def __init__(self, settings=None, slow: float = 0.05):
        self.revisions, self.slow, self.source_time = 0, slow, (0.0, 0.0)

    def revision(self):
        time.sleep(self.slow)  # a poll takes a while: meanwhile the other tasks ask too
        self.revisions += 1
        return 100 + self.revisions

    def collections(self, revision, since=0):
        from types import SimpleNamespace
        return [SimpleNamespace(id=r, create_time=r, name=f"c{r}") for r in range(since + 1, revision + 1)]

    def partitions(self, collection_id=None, revision=None, since=0):
        return []

    def load_keys(self, revision=None):
        return {}

    def close(self):
        pass


def test_the_tasks_of_a_server_share_the_polls_of_the_source_catalog():
    """Issue 17, item 16: each task polled the whole catalog after each tick it read; a hundred tasks kept the
    source's etcd busy with nothing else. A poll now serves every task that asked before it started."""
    import threading
    catalog = FakeCatalog()
    feed = m.CatalogFeed(None, m.RetryPolicy(max_backoff=1.0), open_meta=lambda settings: catalog)
    try:
        first = feed.poll_after(time.monotonic(), 5)
        polls, barrier = [], threading.Barrier(20)

        def task():
            barrier.wait()
            asked = time.monotonic()
            poll = feed.poll_after(asked, 5)
            assert poll is not None and poll.started_at > asked, "a poll that started after the ask"
            polls.append(poll)
        threads = [threading.Thread(target=task) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(polls) == 20 and catalog.revisions <= 3, f"{catalog.revisions - 1} polls for 20 tasks"
        # each task takes the changes since the last poll it saw, from the feed's polls
        cursor = object.__new__(m.CatalogPoller)
        cursor.meta, cursor.revision, cursor.load_keys = None, first.revision, {}
        latest = polls[-1]
        assert feed.between(first.revision, latest.revision) is not None
        changes = cursor.take(latest, feed)
        assert sorted(c.collection_id for c in changes) == list(range(first.revision + 1, latest.revision + 1))
        assert cursor.take(latest, feed) == [], "nothing twice"
    finally:
        feed.close()


def test_a_task_the_catalog_feed_lost_track_of_reads_its_own_way():
    feed = m.CatalogFeed(None, m.RetryPolicy(max_backoff=1.0), open_meta=lambda settings: FakeCatalog(slow=0.0))
    try:
        latest = feed.poll_after(time.monotonic(), 5)
        latest = feed.poll_after(time.monotonic(), 5)
        own = FakeCatalog(slow=0.0)
        cursor = m.CatalogPoller.__new__(m.CatalogPoller)
        cursor.meta, cursor.revision, cursor.load_keys = own, 90, {}  # listed before the feed's first poll
        assert feed.between(90, latest.revision) is None
        changes = cursor.take(latest, feed)
        assert sorted(c.collection_id for c in changes) == list(range(91, latest.revision + 1))
    finally:
        feed.close()


def test_an_unnamed_create_index_replayed_late_takes_the_name_of_the_index_it_made():
    """Found by the model-based test with restarts mixed in: an unnamed CreateIndex replayed after the source had
    dropped that index and made another on the field took the newer one's name (and its drop then missed)."""
    indexes = [m.SourceIndex("v", "v", (("index_type", "FLAT"),), 100),
               m.SourceIndex("v", "v_idx", (("index_type", "IVF_FLAT"),), 300),
               m.SourceIndex("w", "w_idx", (), 200)]
    assert m.index_made_at(indexes, "v", 100) == "v"
    assert m.index_made_at(indexes, "v", 300) == "v_idx"
    assert m.index_made_at(indexes, "x", 100) == "x", "no index of the field known: the field's name"


def test_a_database_drop_takes_the_copies_whose_source_the_source_forgot_while_the_task_was_stopped():
    """Found by the model-based test with restarts mixed in (a scoped task): a collection dropped while the task
    was stopped, then forgotten by the source's etcd, left its copy, and the database's drop was refused "not
    empty" for good. The source drops a database only once it is empty: the copy goes."""
    from types import SimpleNamespace
    dropped = []
    copies = object.__new__(m.TargetCopies)
    copies.tid = "t1"
    copies.names = SimpleNamespace(source=lambda db, name: (db, name))
    copies.catalog = SimpleNamespace(created_at=lambda db, name, ts: None)
    copies.mirror = SimpleNamespace(drop_collection=lambda target, ts, messages, outbox: dropped.append(target.name))
    copies.outbox = None
    target = m.TargetCollection(7, "d1", "c0", 50, ["ch_1_7v0"], {}, {"_default": 1})
    copies.meta = SimpleNamespace(collections=lambda: [])
    assert copies.drop_leftover(target, 100) and dropped == ["c0"]
    live = SimpleNamespace(db_name="d1", name="c0", dropped=False)
    copies.meta = SimpleNamespace(collections=lambda: [live])
    assert not copies.drop_leftover(target, 100) and dropped == ["c0"], "a live source collection of the name stays"


def test_a_database_drop_takes_the_copies_whose_source_collection_is_not_live_in_a_live_database():
    """Seen in CI (a scoped task, a pause and resume mixed in): the database's drop was refused "not empty",
    and its repair kept a copy because the source's etcd still showed that collection not dropped, though the
    source had dropped its database (which it does only when no collection in it is available). A collection of
    a database the source no longer has is not live: the copy goes."""
    from types import SimpleNamespace
    dropped = []
    copies = object.__new__(m.TargetCopies)
    copies.tid = "t1"
    copies.names = SimpleNamespace(source=lambda db, name: (db, name))
    source = SimpleNamespace(id=11, qualified_name="d1.c1")
    copies.catalog = SimpleNamespace(created_at=lambda db, name, ts: source)
    copies.drop = lambda source, target, ts: dropped.append(target.name)
    target = m.TargetCollection(7, "d1", "c1", 50, ["ch_1_7v0"], {}, {"_default": 1})
    in_d1 = SimpleNamespace(db_id=5, dropped=False)
    copies.meta = SimpleNamespace(collection=lambda collection_id: in_d1, databases=lambda: {1: "default", 5: "d1"})
    assert not copies.drop_leftover(target, 100) and dropped == [], "live in a live database: it stays"
    copies.meta = SimpleNamespace(collection=lambda collection_id: in_d1, databases=lambda: {1: "default"})
    assert copies.drop_leftover(target, 100) and dropped == ["c1"]


class DatabaseWriter(ScriptedWriter):
    """A scripted writer whose target holds one database of collections, each made at a given time (name -> ts)."""

    def __init__(self, answers, made: dict[str, int]):
        super().__init__(answers)
        self.made = made

    def call(self, op, method, request, db_name="", ok_if=None, transient_if=None, explained_if=None):
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        if method == "ShowCollections":
            self.calls.append(method)
            return milvus_pb2.ShowCollectionsResponse(status=common_pb2.Status(), collection_names=list(self.made))
        if method == "DescribeCollection":
            return milvus_pb2.DescribeCollectionResponse(
                status=common_pb2.Status(), collectionID=7, created_timestamp=self.made[request.collection_name],
                virtual_channel_names=["ch_1_7v0"])
        if method == "ShowPartitions":
            return milvus_pb2.ShowPartitionsResponse(status=common_pb2.Status(), partition_names=["_default"],
                                                     partitionIDs=[71])
        return super().call(op, method, request, db_name, ok_if, transient_if, explained_if)


NOT_EMPTY = "database:d1 not empty, must drop all collections before drop database"


def test_a_database_drop_replayed_after_the_database_was_made_again_is_skipped():
    """Found by the model-based test (CI, seed 1511153689: create and drop d1, create d1 again, pause and resume,
    create d1.c0, index, load, drop it, drop d1): the resumed task re-read the first DropDatabase d1 after its
    catalog had made the copy of the newer d1.c0; that drop was refused "not empty", the repair kept the copy
    (its source was live then) and the task paused. A copy made after the drop's time is in a later database of
    that name: the drop is behind it."""
    writer = DatabaseWriter({"DropDatabase": [NOT_EMPTY]}, {"c0": 300})
    left = []
    m.TargetMirror(writer, "t1").drop_database("d1", 100, lambda target, ts: left.append(target.name) or False)
    assert writer.calls == ["DropDatabase", "ShowCollections"] and left == [], "skipped, nothing dropped"
    # a drop that is not stale still takes the leftovers of the database it drops, then the database
    writer = DatabaseWriter({"DropDatabase": [NOT_EMPTY]}, {"c0": 50})
    m.TargetMirror(writer, "t1").drop_database("d1", 100, lambda target, ts: left.append(target.name) or True)
    assert writer.calls == ["DropDatabase", "ShowCollections", "DropDatabase"] and left == ["c0"]
    # an older leftover next to a newer copy: the leftover goes all the same, the database stays
    writer, left = DatabaseWriter({"DropDatabase": [NOT_EMPTY]}, {"old": 50, "c0": 300}), []
    m.TargetMirror(writer, "t1").drop_database("d1", 100, lambda target, ts: left.append(target.name) or True)
    assert writer.calls == ["DropDatabase", "ShowCollections"] and left == ["old"]


def test_the_retry_policy_waits_grow_and_never_exceed_retry_max_backoff():
    for most in (0.01, 0.3, 1.0, 10.0, 1000.0):
        policy = m.RetryPolicy(timeout=600, max_backoff=most)
        delays = [policy.delay(tries) for tries in range(1, 80)]  # 80: far past where 2 ** n overflows a float wait
        assert all(0 < delay <= most for delay in delays), f"a wait longer than retryMaxBackoff {most}"
        assert delays == sorted(delays) and delays[-1] == most, "the waits grow up to retryMaxBackoff"
        growing = [delay for delay in delays if delay < most]
        assert all(b == 2 * a for a, b in zip(growing, growing[1:])), "each wait doubles the one before"
    assert m.RetryPolicy(max_backoff=10).delay(1) == m.RetryPolicy.FIRST
    assert m.RetryPolicy.of(m.ReplicationSettings(retry_timeout=7, retry_max_backoff=3)) == m.RetryPolicy(7, 3)


class RecordingEvent(threading.Event):
    """A stop event that notes every wait taken on it with a timeout."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def wait(self, timeout=None):
        if timeout is not None:
            self.waits.append(timeout)
        return super().wait(timeout)


class RecordingCondition(threading.Condition):
    """The catalog feed's condition, noting the waits its poll thread takes with a timeout."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def wait_for(self, predicate, timeout=None):
        if timeout is not None and threading.current_thread().name == "cdc-catalog-feed":
            self.waits.append(timeout)
        return super().wait_for(predicate, timeout)


class FlakyCatalog(FakeCatalog):
    def __init__(self, fails):
        super().__init__(slow=0.0)
        self.fails = fails

    def revision(self):
        if self.fails:
            self.fails -= 1
            raise m.TransientError("etcd is away")
        return super().revision()


def failing(times, error, then=None):
    """A call that raises ``error`` ``times`` times, then returns ``then``."""
    left = [times]

    def call(*_, **__):
        if left[0]:
            left[0] -= 1
            raise error
        return then
    return call


FAILURES = 3


def patience_waits(server, replicator, _):
    replicator.stop_event = RecordingEvent()
    replicator.patience("applier").run("writing", failing(FAILURES, m.TransientError("busy")),
                                       lambda exc: isinstance(exc, m.TransientError))
    return replicator.stop_event.waits


def catalog_feed_waits(server, replicator, _):
    feed = replicator.catalog_feed
    feed.changed, feed.open_meta = RecordingCondition(), lambda settings: FlakyCatalog(FAILURES)
    assert feed.poll_after(time.monotonic(), 10) is not None
    return feed.changed.waits


def ticker_waits(server, replicator, _):
    clock, writer = replicator.clock, RecordingWriter()
    clock.stopping = RecordingEvent()
    clock.make_writer = failing(FAILURES, m.TlsFileError("ca_pem_path"), writer)
    clock.join("t1", lambda: 100, replicator.task.connect)
    clock.add_channels(["a"])
    deadline = time.monotonic() + 10
    while not writer.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    return clock.stopping.waits


def applier_of(replicator):
    """An applier of fakes (tests/test_applier.py's) with the replicator's policy, stop event and waits."""
    import dataclasses
    from test_applier import make_applier
    ctx = make_applier()[1]
    return m.Applier(dataclasses.replace(ctx, retry=replicator.retry, stop=replicator.stop_event,
                                         waits=replicator.waits))


def meta_store_waits_at_start(server, replicator, _):
    replicator.stop_event = RecordingEvent()
    applier = applier_of(replicator)
    applier._with_store("loading the checkpoints", failing(FAILURES, m.MetaStoreUnavailable("away")))
    return replicator.stop_event.waits


def meta_store_waits_at_checkpoints(server, replicator, _):
    applier, waits = applier_of(replicator), []
    for _ in range(FAILURES):
        applier._store_down(m.MetaStoreUnavailable("away"))
        waits.append(applier.store_retry_at - time.monotonic())  # scheduled, not slept: at most the delay
    return waits


def pause_store_waits(server, replicator, slept):
    shown = []
    store = failing(FAILURES, m.MetaStoreUnavailable("away"), SimpleNamespace(state=m.TaskState.PAUSED,
                                                                               reason="refused"))

    def noting_store(*args, **kwargs):
        shown.append([w.operation for w in replicator.waits.snapshot()])  # what get shows meanwhile
        return store(*args, **kwargs)
    server._store = noting_store
    server._on_failure(replicator, "refused")
    assert shown[1:] == [["storing the task's pause in the meta store"]] * FAILURES, shown
    assert replicator.waits.snapshot() == [], "no wait shown once the pause is stored"
    return slept


def cluster_pause_store_waits(server, replicator, slept):
    cluster = m.ClusterTaskManager(server.config, server.store, SimpleNamespace(), m.Metrics(), "s1", 10.0)
    assert cluster.retry == server.retry
    cluster.store = SimpleNamespace(update_task=failing(FAILURES, m.MetaStoreUnavailable("away")))
    failed = SimpleNamespace(task=SimpleNamespace(task_id="t1", created_at=1.0), fence=None, waits=m.Waits())
    cluster._on_failure(failed, "refused")
    assert failed.waits.snapshot() == [], "no wait shown once the pause is stored"
    return slept


RETRYING_PARTS = [patience_waits, catalog_feed_waits, ticker_waits, meta_store_waits_at_start,
                  meta_store_waits_at_checkpoints, pause_store_waits, cluster_pause_store_waits]


@pytest.mark.parametrize("part", RETRYING_PARTS, ids=lambda part: part.__name__)
@pytest.mark.parametrize("most", [0.01, 0.03])
def test_retry_max_backoff_bounds_the_waits_of_every_retrying_part(tmp_path, monkeypatch, part, most):
    """Issue 18: retries were written six times; changing retryMaxBackoff must change every one of them. Each
    part is made by a server whose retryMaxBackoff is below the first wait of any backoff (0.5 s), and fails a
    few times: every wait it then takes is retryMaxBackoff, not a wait of its own."""
    import dataclasses
    from pathlib import Path
    config, _ = m.load_config(str(Path(__file__).resolve().parent.parent / "config.yaml"))
    config = dataclasses.replace(config, replication=m.ReplicationSettings(retry_max_backoff=most))
    server = m.TaskManager(config, m.SqliteMetaStore(str(tmp_path / "meta.db"), "cdc"))
    monkeypatch.setattr(m.Replicator, "start", lambda self: None)  # its parts are driven by hand below
    slept, sleep, here = [], time.sleep, threading.current_thread()

    def noted_sleep(seconds):
        if threading.current_thread() is here:
            slept.append(seconds)
        sleep(seconds)
    monkeypatch.setattr(m.time, "sleep", noted_sleep)
    task = server.tasks["t1"] = m.TaskInfo("t1", m.ConnectParam("http://127.0.0.1:9"), [{"name": "*"}])
    try:
        replicator = server._run(task)
        assert server.retry == m.RetryPolicy(timeout=config.replication.retry_timeout, max_backoff=most)
        for holder in (replicator, replicator.clock, replicator.catalog_feed, replicator.patience("reader")):
            assert holder.retry is server.retry, f"{type(holder).__name__} has a retry policy of its own"
        waits = part(server, replicator, slept)
    finally:
        monkeypatch.setattr(m.time, "sleep", sleep)
        server.shutdown()
        server.store.close()
    assert len(waits) >= FAILURES, f"{part.__name__}: {waits}"
    assert all(most * 0.5 < wait <= most for wait in waits), f"{part.__name__} ignores retryMaxBackoff: {waits}"


class DescribingWriter:
    """A target writer that answers describes from what the target has now (``collection_id``, ``partitions``)
    and makes the partitions it is asked to."""
    metrics = None

    def __init__(self, collection_id, partitions):
        self.collection_id, self.partitions = collection_id, partitions

    def base(self, msg_type, ts):
        from pymilvus.grpc_gen import common_pb2
        return common_pb2.MsgBase(msg_type=msg_type, timestamp=ts)

    def call(self, op, method, request, db_name="", ok_if=None, transient_if=None, explained_if=None):
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        if method == "DescribeCollection":
            return milvus_pb2.DescribeCollectionResponse(status=common_pb2.Status(), collectionID=self.collection_id,
                                                         created_timestamp=1, virtual_channel_names=["ch_1_7v0"])
        if method == "ShowPartitions":
            return milvus_pb2.ShowPartitionsResponse(status=common_pb2.Status(), partition_names=list(self.partitions),
                                                     partitionIDs=list(self.partitions.values()))
        if method == "CreatePartition":
            self.partitions[request.partition_name] = 70 + len(self.partitions) + 1
        return common_pb2.Status()


def test_the_mirror_keeps_the_collection_the_copies_hold_current():
    """Issue 18, item 3: a copy's TargetCollection was cached twice (the mirror's, TargetCopies'), and making a
    partition patched the stale one. The mirror owns the objects: a fresh description updates the one held."""
    writer = DescribingWriter(7, {"_default": 71})
    mirror = m.TargetMirror(writer, "t1")
    held = mirror.collection("shop", "c")  # as TargetCopies holds a copy
    assert mirror.ensure_partition(held, "p1", 100) == 72
    assert held.partitions == {"_default": 71, "p1": 72} and mirror.collection("shop", "c") is held
    writer.partitions["p2"] = 80  # made meanwhile (a repair, another describe)
    assert mirror.collection("shop", "c", fresh=True) is held and held.partitions["p2"] == 80
    writer.collection_id = 8      # another incarnation of the name: a collection of its own
    newer = mirror.collection("shop", "c", fresh=True)
    assert newer is not held and (newer.id, held.id) == (8, 7)


class LateLandingStore(m.SqliteMetaStore):
    """A store whose next ``late`` task writes time out for the caller but land all the same (a frozen etcd
    applies what it had received once it runs again): at once, or when the test calls ``land`` (after what the
    server wrote meanwhile); its following ``down`` writes fail and change nothing."""

    def __init__(self, path, land_at_once=True):
        super().__init__(path, "cdc")
        self.late, self.down, self.land_at_once = 0, 0, land_at_once
        self.held: list = []

    def _write(self, primitive, *args):
        if self.late:
            self.late -= 1
            if self.land_at_once:
                primitive(*args)
            else:
                self.held.append((primitive, args))
            raise sqlite3.OperationalError("etcd connection timeout")
        if self.down:
            self.down -= 1
            raise sqlite3.OperationalError("etcd connection timeout")
        return primitive(*args)

    def land(self) -> list[bool]:
        landed = [primitive(*args) for primitive, args in self.held]
        self.held.clear()
        return landed

    def _insert_task(self, *args):
        return self._write(super()._insert_task, *args)

    def _replace_task(self, *args):
        return self._write(super()._replace_task, *args)

    def _delete_task(self, *args):
        return self._write(super()._delete_task, *args)


@pytest.mark.parametrize("request_type", ["pause", "delete"])
@pytest.mark.parametrize("lands", ["before the write-back", "after the write-back"])
def test_a_task_write_answered_503_that_lands_later_leaves_the_store_as_memory_holds_it(tmp_path, request_type,
                                                                                        lands):
    """Seen in CI (tests/test_faults.py, the meta store's etcd frozen): a pause answered 503 ("changes nothing")
    landed in the store once etcd ran again, so the store said Paused while the task ran. Memory is what the
    server holds: it is written back once the store answers; and a late write is conditional on the document it
    read, so one that lands after the write-back (seen in CI too) changes nothing. A delete answered 503 as well."""
    import dataclasses
    from pathlib import Path
    config, _ = m.load_config(str(Path(__file__).resolve().parent.parent / "config.yaml"))
    config = dataclasses.replace(config, replication=m.ReplicationSettings(retry_max_backoff=0.05))
    store = LateLandingStore(str(tmp_path / "meta.db"), land_at_once=lands == "before the write-back")
    server = m.TaskManager(config, store)
    # a delete of a running task starts it again when the store did not answer: no replicator in a unit test
    state = m.TaskState.RUNNING if request_type == "pause" else m.TaskState.PAUSED
    try:
        task = server.tasks["t1"] = m.TaskInfo("t1", m.ConnectParam("http://127.0.0.1:9"), [{"name": "*"}],
                                               state=state)
        store.save_task("t1", task.to_store())
        store.save_checkpoints("t1", [m.Checkpoint("ch_0", b"id", 5)])
        store.late, store.down = 1, 3
        with pytest.raises(m.MetaStoreUnavailable):
            getattr(server, request_type)("t1")
        assert server.tasks["t1"].state == state
        if lands == "before the write-back":
            assert store.load_tasks().get("t1", {}).get("state") != state.value, "the write landed after all"
        deadline = time.monotonic() + 5
        while server.unsure and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.unsure and not server.busy and store.down == 0, "written back once the store answered"
        if lands == "after the write-back":
            assert store.land() == [False], "the late write found another document than the one it read"
        assert store.load_tasks()["t1"]["state"] == state.value
        if request_type == "delete" and lands == "after the write-back":
            assert store.load_checkpoints("t1"), "the checkpoints stay with the task"
    finally:
        server.shutdown()
        store.close()


def test_a_write_back_waiting_for_the_store_shows_in_get(tmp_path):
    """Issue 18: every wait is shown the same way; the write-back of a task the store did not answer for too."""
    import dataclasses
    from pathlib import Path
    config, _ = m.load_config(str(Path(__file__).resolve().parent.parent / "config.yaml"))
    config = dataclasses.replace(config, replication=m.ReplicationSettings(retry_max_backoff=0.05))
    store = LateLandingStore(str(tmp_path / "meta.db"))
    server = m.TaskManager(config, store)
    try:
        task = server.tasks["t1"] = m.TaskInfo("t1", m.ConnectParam("http://127.0.0.1:9"), [{"name": "*"}],
                                               state=m.TaskState.PAUSED)
        store.save_task("t1", task.to_store())
        store.down = 10 ** 6
        server._write_back_later("t1")
        deadline = time.monotonic() + 5
        while not server.get("t1").get("retrying") and time.monotonic() < deadline:
            time.sleep(0.02)
        (wait,) = server.get("t1")["retrying"]
        assert wait["operation"] == "writing the task back to the meta store" and "timeout" in wait["last_error"]
        store.down = 0
        while server.unsure and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        assert not server.unsure and "retrying" not in server.get("t1")
    finally:
        server.shutdown()
        store.close()


def test_every_task_document_written_is_unique_and_readers_never_see_what_makes_it_so(tmp_path):
    """Compare-and-set on the text is compare-and-set on the write only if no two writes leave the same text."""
    store = m.SqliteMetaStore(str(tmp_path / "meta.db"), "cdc")
    try:
        store.save_task("t1", {"task_id": "t1", "state": "Running"})
        first = store._load_task("t1")
        store.save_task("t1", {"task_id": "t1", "state": "Running"})
        assert store._load_task("t1") != first
        assert store.load_tasks() == {"t1": {"task_id": "t1", "state": "Running"}}
        assert store.update_task("t1", lambda data: {**data, "state": "Paused"}) == {"task_id": "t1",
                                                                                       "state": "Paused"}
        assert not store._replace_task("t1", first, "{}") and not store._delete_task("t1", first)
        assert not store._delete_task("t1", None), "a conditional delete of no document finds one"
        store.delete_task("t1")
        assert store.load_tasks() == {}
    finally:
        store.close()
