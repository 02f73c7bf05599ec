"""Unit tests of the ordering rule (ChangeOrder): pure bookkeeping, no server."""
from __future__ import annotations

import dataclasses

import milvus_cdc as m
from milvus_cdc import InputKind

CAT, OPS = m.InputKind.CATALOG, m.InputKind.OPERATIONS


def pos(n: int) -> bytes:
    return n.to_bytes(8, "little")


def order_with(*inputs: tuple[str, InputKind], applied: int = 0) -> m.ChangeOrder:
    order = m.ChangeOrder(applied)
    for name, kind in inputs:
        order.add_input(name, kind)
    return order


def items(ready: list[m.Change]) -> list:
    return [c.item for c in ready]


def test_nothing_is_ready_until_every_input_has_promised():
    order = order_with(("dml_0", InputKind.DATA), ("dml_1", InputKind.DATA), ("rep", OPS))
    order.offer("dml_0", 10, "insert@10", pos(1))
    order.promise("dml_0", 20)
    order.promise("rep", 20)
    assert order.take() == ([], 0), "dml_1 has promised nothing: something at or below 10 may still come there"
    order.promise("dml_1", 15)
    ready, watermark = order.take()
    assert items(ready) == ["insert@10"] and watermark == 15


def test_changes_come_in_timestamp_order_across_inputs_and_kinds():
    order = order_with(("cat", CAT), ("dml_0", InputKind.DATA), ("rep", OPS))
    order.offer("rep", 30, "load@30")
    order.offer("dml_0", 40, "insert@40", pos(1))
    order.offer("dml_0", 30, "insert@30", pos(2))  # a message above a later tick may come first
    order.offer("cat", 30, "created@30")
    order.offer("rep", 50, "flush@50")
    for name in ("cat", "dml_0", "rep"):
        order.promise(name, 45)
    ready, watermark = order.take()
    assert watermark == 45
    assert items(ready) == ["created@30", "insert@30", "load@30", "insert@40"], \
        "same time: the catalog first, then data, then operations; flush@50 waits"


def test_the_watermark_is_the_lowest_promise_and_never_goes_back():
    order = order_with(("a", InputKind.DATA), ("b", InputKind.DATA), applied=100)
    order.promise("a", 50)
    order.promise("b", 70)
    assert order.watermark() == 100, "a restart never goes below what is applied"
    order.promise("a", 150)
    order.promise("b", 120)
    order.promise("a", 140)  # an older promise read late changes nothing
    assert order.watermark() == 120


def test_a_change_at_or_below_what_is_applied_is_ready_at_once():
    order = order_with(("dml", InputKind.DATA), ("rep", OPS))
    order.promise("dml", 100)
    order.promise("rep", 100)
    ready, watermark = order.take()
    order.commit([c.seq for c in ready], watermark)
    order.offer("rep", 90, "late index@90")  # an operation whose write lagged its own timestamp
    ready, _ = order.take()
    assert items(ready) == ["late index@90"]


def test_an_input_added_holds_the_watermark_until_it_promises():
    order = order_with(("cat", CAT), ("dml_0", InputKind.DATA))
    order.offer("cat", 10, "created X@10")
    order.offer("dml_0", 30, "insert other@30", pos(1))
    order.promise("cat", 40)
    order.promise("dml_0", 40)
    ready, watermark = order.take()
    assert items(ready) == ["created X@10", "insert other@30"]
    # Applying the creation adds X's channel: the applier stops there and commits up to just below the change
    # that added it; what follows waits for that channel.
    order.add_input("dml_1", InputKind.DATA)
    assert order.added
    order.commit([ready[0].seq], ready[0].ts - 1)
    order.offer("dml_1", 20, "insert X@20", pos(7))
    ready, watermark = order.take()
    assert ready == [] and watermark == 9 and not order.added
    assert order.holding() == ["dml_1"], "get says which input the task waits for"
    order.promise("dml_1", 40)
    assert items(order.take()[0]) == ["insert X@20", "insert other@30"]


def test_commit_removes_what_was_applied_and_keeps_the_rest():
    order = order_with(("a", InputKind.DATA))
    for ts, n in ((10, 1), (20, 2), (30, 3)):
        order.offer("a", ts, f"m{ts}", pos(n))
    order.promise("a", 25)
    ready, watermark = order.take()
    order.commit([c.seq for c in ready], watermark)
    assert order.applied == 25 and [c.item for c in order.inputs["a"].pending] == ["m30"]


def test_a_restart_skips_what_was_applied_and_resumes_at_the_first_unapplied_message():
    order = m.ChangeOrder(applied=500)
    order.add_input("dml", InputKind.DATA, m.StartAt(m.StartKind.AT, pos(10)), durable=500)
    assert order.resume("dml") == m.StartAt(m.StartKind.AT, pos(10))
    order.offer("dml", 480, "applied before the crash", pos(10))
    order.offer("dml", 520, "new", pos(11))
    order.promise("dml", 510, pos(12))  # a tick below a message read before it
    assert [c.item for c in order.inputs["dml"].pending] == ["new"]
    assert order.resume("dml") == m.StartAt(m.StartKind.AT, pos(11)), "not after the tick: message 11 is not applied"
    ready, watermark = order.take()
    assert ready == [] and watermark == 510
    order.promise("dml", 530, pos(13))
    ready, watermark = order.take()
    order.commit([c.seq for c in ready], watermark)
    assert order.resume("dml") == m.StartAt(m.StartKind.AFTER, pos(13))
    fresh = m.ChangeOrder()
    fresh.add_input("new", InputKind.DATA)
    assert fresh.resume("new") is None, "nothing read and no start position: no checkpoint yet"


def test_a_removed_input_no_longer_holds_or_offers():
    order = order_with(("a", InputKind.DATA), ("b", InputKind.DATA))
    order.promise("a", 50)
    order.remove_input("b")
    order.offer("b", 10, "read before its removal", pos(1))
    order.promise("b", 5)
    assert order.take() == ([], 50)


def test_release_before_drop_whatever_input_carries_them():
    """Load, create partition P, insert into P, release P, drop P, back to back: the release (seen in the catalog,
    which keeps no time for it) is placed right after the previous poll's fence, so before the drop."""
    order = order_with(("cat", CAT), ("dml", InputKind.DATA), ("rep", OPS))
    order.offer("rep", 100, "load collection@100")
    order.offer("cat", 110, "partition P created@110")
    order.offer("dml", 120, "insert into P@120", pos(1))
    order.promise("cat", 125)   # the poll before the release
    order.offer("dml", 140, "drop P@140", pos(2))
    order.offer("cat", 125 + 1, "load state changed (P released)")
    order.promise("cat", 150)
    order.promise("dml", 150)
    order.promise("rep", 150)
    assert items(order.take()[0]) == ["load collection@100", "partition P created@110", "insert into P@120",
                                      "load state changed (P released)", "drop P@140"]


def test_changes_handed_out_are_not_taken_again_until_committed():
    order = order_with(("a", InputKind.DATA))
    for ts, n in ((10, 1), (20, 2)):
        order.offer("a", ts, f"m{ts}", pos(n))
    order.promise("a", 15)
    first, watermark = order.take()
    first_seqs = order.hand_out(first)  # on its way to the target, not yet acknowledged
    order.promise("a", 25)
    second, _ = order.take()
    assert items(first) == ["m10"] and items(second) == ["m20"], "m10 is not sent twice"
    assert order.resume("a") == m.StartAt(m.StartKind.AT, pos(1)), "a restart resumes at what is not acknowledged"
    order.hand_out(second)
    order.commit(first_seqs, watermark)
    assert order.applied == 15 and order.resume("a") == m.StartAt(m.StartKind.AT, pos(2))


def test_a_channel_removed_and_added_again_takes_nothing_read_in_its_first_life():
    """Batches of a channel's first life may still be queued when it is added again (its last collection dropped,
    a new one created on it): they are stale, not the new input's (issue 17, item 3)."""
    order = m.ChangeOrder()
    order.add_input("ops", m.InputKind.OPERATIONS, generation=1)
    order.add_input("dml", m.InputKind.DATA, generation=1)
    order.promise("ops", 100, generation=1)
    order.offer("dml", 10, "first life", b"\x01", generation=1)
    order.remove_input("dml")
    order.add_input("dml", m.InputKind.DATA, generation=2)
    order.offer("dml", 20, "stale", b"\x02", generation=1)   # read before the remove, queued
    order.promise("dml", 90, b"\x03", generation=1)          # a stale tick must not promise for the new life
    assert order.watermark() == 0, "a stale promise moved the watermark"
    order.offer("dml", 30, "second life", b"\x04", generation=2)
    order.promise("dml", 40, b"\x05", generation=2)
    ready, watermark = order.take()
    assert [c.item for c in ready] == ["second life"] and watermark == 40


def test_what_waits_behind_a_silent_catalog_is_counted_and_named():
    """The applier leaves the read queue be when the changes waiting above the watermark pass a byte cap and only
    the catalog holds them back (the source's etcd out under load): the reader then waits instead of memory
    growing (issue 17, item 9). A DML channel holding back must not stop the reading: its promise is read there."""
    order = m.ChangeOrder()
    order.add_input("catalog", InputKind.CATALOG)
    order.add_input("dml", InputKind.DATA)
    message = m.SourceMessage("dml", b"\x01", 400, 10, b"x" * 1000)
    for ts in (10, 20, 30):
        order.offer("dml", ts, dataclasses.replace(message, timestamp=ts), b"%d" % ts)
    order.promise("dml", 20)
    assert order.held_bytes == 3000 and order.held_by_only(InputKind.CATALOG)
    order.promise("catalog", 40)
    ready, _ = order.take()
    order.hand_out(ready)
    assert order.held_bytes == 1000 and not order.held_by_only(InputKind.CATALOG)  # now the DML channel holds
    order.remove_input("dml")
    assert order.held_bytes == 0


def checkpoints_of(order: m.ChangeOrder) -> dict[str, m.Checkpoint]:
    """What the applier stores: every input's resume position and what is applied after it."""
    found = {}
    for name in order.names():
        resume = order.resume(name)
        if resume is not None:
            found[name] = m.Checkpoint(name, resume.msg_id, order.applied, resume.kind,
                                       order.applied_after_resume(name))
    return found


def restarted(saved: dict[str, m.Checkpoint], kinds: dict[str, InputKind]) -> m.ChangeOrder:
    """A new run from stored checkpoints, as the applier starts one (json round trip included)."""
    saved = {n: m.Checkpoint.from_json(c.to_json()) for n, c in saved.items()}
    durable = max(c.timestamp for c in saved.values())
    order = m.ChangeOrder(durable)
    for name, checkpoint in saved.items():
        order.add_input(name, kinds[name], m.StartAt(checkpoint.resume, checkpoint.msg_id), durable=durable,
                        skip_positions=checkpoint.applied)
    return order


def test_an_operation_written_after_the_watermark_passed_it_survives_a_restart():
    # Issue 17 item 1: CreateIndex, Load, Flush and database operations reach the replicate channel after they
    # finished, below what is already applied. Stopped after the checkpoint passed their time and before they
    # were applied, they were skipped for good by the restart's timestamp rule.
    kinds = {"dml": InputKind.DATA, "rep": OPS}
    order = order_with(("dml", InputKind.DATA), ("rep", OPS))
    order.offer("dml", 100, "insert@100", pos(1))
    order.promise("dml", 150, pos(2))
    order.promise("rep", 150, pos(10))
    ready, watermark = order.take()
    order.commit(order.hand_out(ready), watermark)
    order.offer("rep", 120, "create index@120", pos(11))  # late: the watermark is past it already
    saved = checkpoints_of(order)  # the task stops here, the index not applied
    assert saved["rep"].timestamp == 150
    again = restarted(saved, kinds)
    again.offer("rep", 120, "create index@120", pos(11))
    again.promise("dml", 160, pos(3))
    again.promise("rep", 160, pos(12))
    assert items(again.take()[0]) == ["create index@120"]


def test_a_restart_skips_the_operations_applied_behind_one_still_waiting():
    kinds = {"dml": InputKind.DATA, "rep": OPS}
    order = order_with(("dml", InputKind.DATA), ("rep", OPS), applied=150)
    order.promise("dml", 150, pos(2))
    order.offer("rep", 200, "drop collection@200", pos(10))   # waits for the DML channel's tick
    order.offer("rep", 120, "load@120", pos(11))              # late: applied at once
    order.offer("rep", 130, "flush@130", pos(12))             # late too, and still out when the task stops
    ready, watermark = order.take()
    assert items(ready) == ["load@120", "flush@130"]
    order.hand_out(ready)
    order.commit([ready[0].seq], watermark)
    saved = checkpoints_of(order)
    assert (saved["rep"].resume, saved["rep"].msg_id, saved["rep"].applied) == ("at", pos(10), (pos(11),))
    again = restarted(saved, kinds)
    for ts, item, n in ((200, "drop collection@200", 10), (120, "load@120", 11), (130, "flush@130", 12)):
        again.offer("rep", ts, item, pos(n))
    again.promise("dml", 210, pos(3))
    again.promise("rep", 210, pos(13))
    assert items(again.take()[0]) == ["flush@130", "drop collection@200"], "load applied once, flush not lost"
    assert again.applied_after_resume("rep") == ()


def test_positions_applied_but_not_read_again_stay_in_the_next_checkpoint():
    order = m.ChangeOrder(150)
    order.add_input("rep", OPS, m.StartAt(m.StartKind.AT, pos(10)), skip_positions=[pos(11)])
    order.offer("rep", 200, "waits", pos(10))
    assert checkpoints_of(order)["rep"].applied == (pos(11),), "a stop before message 11 is read again"
