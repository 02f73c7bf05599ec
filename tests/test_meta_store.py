"""One contract for the three meta stores, run on real servers: sqlite (a temporary file), MySQL (the stack's
MariaDB, reached through a Go-style DSN) and etcd (the stack's etcd)."""
from __future__ import annotations

import sqlite3
import threading
import time
import uuid

import pymysql
import pyetcd
import pytest

import milvus_cdc as m


def settings_for(kind: str, stack: dict, tmp_path, root_path: str, database: str | None = None):
    if kind == "sqlite":
        return m.MetaStoreSettings(m.StoreType.SQLITE, root_path, sqlite_path=str(tmp_path / "meta.db"))
    if kind == "mysql":
        my = stack["mysql"]
        dsn = f"{my['user']}:{my['password']}@tcp({my['host']}:{my['port']})/{database or my['database']}?charset=utf8"
        return m.MetaStoreSettings(m.StoreType.MYSQL, root_path, mysql=m.parse_mysql_dsn(dsn))
    return m.MetaStoreSettings(m.StoreType.ETCD, root_path, etcd=m.EtcdSettings(endpoints=(f"http://{stack['etcd']}",)))


@pytest.fixture(params=["sqlite", "mysql", "etcd"])
def opener(request, stack, tmp_path):
    """Opens stores of one kind; every test gets its own rootPath, so tests never see each other's data."""
    opened = []
    root_path = f"cdc-contract-{uuid.uuid4().hex[:10]}"

    def open_store(root: str | None = None, database: str | None = None) -> m.MetaStore:
        store = m.open_meta_store(settings_for(request.param, stack, tmp_path, root or root_path, database))
        opened.append(store)
        return store
    open_store.kind, open_store.root_path = request.param, root_path
    yield open_store
    for store in opened:
        try:
            store.close()
        except Exception:  # noqa: BLE001 - closed by the test already
            pass


def checkpoints(*pairs) -> list[m.Checkpoint]:
    return [m.Checkpoint(channel, msg_id, ts, m.StartKind(resume)) for channel, msg_id, ts, resume in pairs]


def test_task_document_round_trip_and_overwrite(opener):
    store = opener()
    info = {"task_id": "t1", "milvus_connect_param": {"uri": "http://h:19530", "token": "root:Milvus"},
            "collection_infos": [{"name": "*"}], "state": "Running", "reason": "", "note": "δοκιμή ✓"}
    store.save_task("t1", info)
    assert store.load_tasks() == {"t1": info}
    store.save_task("t1", {**info, "state": "Paused", "reason": "manually pause through http interface"})
    assert store.load_tasks()["t1"]["state"] == "Paused" and len(store.load_tasks()) == 1


def test_checkpoints_round_trip_and_replace_the_whole_set(opener):
    store = opener()
    first = checkpoints(("by-dev-rootcoord-dml_0", b"\x00\x00\x01\x00\x00\x00\x00\x00", 470672960302874626, "after"),
                        ("by-dev-rootcoord-dml_1", b"\x00" * 8, 2 ** 63 - 1, "at"),
                        ("by-dev-replicate-msg", b"\xff\x00\x7f", 1, "after"))
    store.save_checkpoints("t1", first)
    assert store.load_checkpoints("t1") == {c.channel: c for c in first}
    second = first[:1]
    store.save_checkpoints("t1", second)
    assert store.load_checkpoints("t1") == {c.channel: c for c in second}, "a channel left out disappears"
    assert store.load_checkpoints("unknown") == {}


def test_delete_removes_the_task_and_its_checkpoints_together(opener, stack, tmp_path):
    store = opener()
    for task_id in ("gone", "kept"):
        store.save_task(task_id, {"task_id": task_id})
        store.save_checkpoints(task_id, checkpoints(("ch", b"\x01", 5, "after")))
    store.delete_task("gone")
    assert set(store.load_tasks()) == {"kept"} and store.load_checkpoints("gone") == {}
    assert store.load_checkpoints("kept") != {}
    assert leftovers(opener.kind, stack, tmp_path, opener.root_path, "gone") == []
    assert leftovers(opener.kind, stack, tmp_path, opener.root_path, "kept") != []


def leftovers(kind: str, stack: dict, tmp_path, root_path: str, task_id: str) -> list:
    """What the underlying server still holds for a task, read without the store."""
    if kind == "etcd":
        host, port = stack["etcd"].split(":")
        client = pyetcd.client(host=host, port=int(port))
        return [meta.key for _, meta in client.get_prefix(f"{root_path}/") if meta.key.decode().endswith(task_id)]
    if kind == "sqlite":
        db = sqlite3.connect(tmp_path / "meta.db")
        rows = [r for table in ("task_info", "task_position") for r in db.execute(
            f"SELECT task_id FROM {table} WHERE root_path = ? AND task_id = ?", (root_path, task_id))]
        db.close()
        return rows
    my = stack["mysql"]
    conn = pymysql.connect(host=my["host"], port=my["port"], user=my["user"], password=my["password"],
                           database=my["database"])
    with conn.cursor() as cur:
        rows = []
        for table in ("task_info", "task_position"):
            cur.execute(f"SELECT task_id FROM {table} WHERE root_path = %s AND task_id = %s", (root_path, task_id))
            rows += list(cur.fetchall())
    conn.close()
    return rows


def test_root_paths_separate_tenants_on_one_server(opener):
    one, other = opener(), opener(root=f"other-{uuid.uuid4().hex[:8]}")
    one.save_task("t1", {"task_id": "t1"})
    one.save_checkpoints("t1", checkpoints(("ch", b"\x01", 5, "after")))
    other.save_task("t2", {"task_id": "t2"})
    assert set(one.load_tasks()) == {"t1"} and set(other.load_tasks()) == {"t2"}
    assert other.load_checkpoints("t1") == {}
    other.delete_task("t1")
    assert set(one.load_tasks()) == {"t1"}, "a tenant cannot delete another's task"


def test_data_survives_closing_and_reopening(opener):
    store = opener()
    store.save_task("t1", {"task_id": "t1", "state": "Paused"})
    store.save_checkpoints("t1", checkpoints(("ch", b"\x02", 9, "at")))
    store.close()
    again = opener()
    assert again.load_tasks() == {"t1": {"task_id": "t1", "state": "Paused"}}
    assert again.load_checkpoints("t1")["ch"].resume is m.StartKind.AT


def test_concurrent_checkpoint_writes_stay_whole(opener):
    """Each write replaces the set atomically: the result is exactly one of the sets written."""
    store = opener()
    sets = [checkpoints(*[(f"ch{c}", bytes([w, c]), w * 100 + c, "after") for c in range(5)]) for w in range(8)]
    errors = []

    def write(one_set):
        try:
            for _ in range(10):
                store.save_checkpoints("t1", one_set)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(s,)) for s in sets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.load_checkpoints("t1") in [{c.channel: c for c in s} for s in sets]


def test_mysql_store_creates_its_database_and_tables(stack, tmp_path):
    database = f"cdc_fresh_{uuid.uuid4().hex[:8]}"
    my = stack["mysql"]
    store = m.open_meta_store(settings_for("mysql", stack, tmp_path, "fresh", database))
    try:
        store.save_task("t1", {"task_id": "t1"})
        assert store.load_tasks() == {"t1": {"task_id": "t1"}}
    finally:
        store.close()
        conn = pymysql.connect(host=my["host"], port=my["port"], user=my["user"], password=my["password"])
        with conn.cursor() as cur:
            cur.execute("SHOW TABLES FROM `%s`" % database)
            tables = {row[0] for row in cur.fetchall()}
            cur.execute("DROP DATABASE `%s`" % database)
        conn.close()
    assert tables == {"task_info", "task_position"}


def test_mysql_leases_live_in_utc_whatever_each_servers_session_time_zone(stack, tmp_path):
    """Two servers whose MySQL sessions have other time zones (another host's default, a DST change) see one
    lease expiry: a server that stopped renewing is seen gone after its TTL, not hours later (issue 17, item 12)."""
    root = f"cdc-tz-{uuid.uuid4().hex[:10]}"

    def store_in(zone: str) -> m.MySQLMetaStore:
        settings = settings_for("mysql", stack, tmp_path, root)
        return m.MySQLMetaStore({**settings.mysql, "init_command": f"SET time_zone = '{zone}'"}, root)
    east, west = store_in("+10:00"), store_in("-05:00")
    try:
        east.join("east", ttl=1.0)
        assert "east" in west.servers()
        deadline = time.monotonic() + 10
        while "east" in west.servers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "east" not in west.servers(), "a lease written in another session time zone outlived its TTL"
    finally:
        east.close()
        west.close()


def test_mysql_renewal_fails_when_a_held_target_was_not_renewed_with_the_server(stack, tmp_path):
    """Issue 17, item 7: each MySQL row has its own expiry. A renewal that found the server's row alive but not a
    target's (it ran out, or another server took it after that) said yes, and the holder went on writing to a
    target that was no longer its own."""
    root = f"cdc-renew-{uuid.uuid4().hex[:10]}"
    store = m.MySQLMetaStore(settings_for("mysql", stack, tmp_path, root).mysql, root)
    other = m.MySQLMetaStore(settings_for("mysql", stack, tmp_path, root).mysql, root)
    try:
        lease = store.join("a", ttl=30.0)
        assert store.acquire(lease, "t1") and store.acquire(lease, "t2")
        assert store.renew(lease, {"t1", "t2"})
        with store._transaction() as cur:
            cur.execute("UPDATE cdc_owner SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND WHERE "
                        "root_path = %s AND target = 't2'", (root,))
        assert not store.renew(lease, {"t1", "t2"}), "a target that ran out was renewed with the server"
        assert store.renew(lease, {"t1"}), "the server and its other target are still alive"
        taker = other.join("b", ttl=30.0)
        assert other.acquire(taker, "t2")
        assert not store.renew(lease, {"t1", "t2"}), "a target another server took was counted as renewed"
        assert other.renew(taker, {"t2"})
    finally:
        store.close()
        other.close()


def test_a_task_is_created_once_and_changed_only_over_what_was_read(opener):
    """Issue 17, item 11: the cluster's API writes were read-modify-write; now a create is put-if-absent and a
    change is written only if nobody wrote the task since it was read (else read again)."""
    store = opener()
    info = {"task_id": "t1", "state": "Running", "reason": "", "count": 0}
    assert store.create_task("t1", info)
    assert not store.create_task("t1", {**info, "state": "Paused"}), "a second create with the id wrote over it"
    assert store.load_tasks()["t1"]["state"] == "Running"

    def bump(data: dict) -> dict:
        time.sleep(0.01)  # between the read and the conditional write: where the others' writes land
        return {**data, "count": data["count"] + 1}
    store.UPDATE_TRIES = 200
    threads = [threading.Thread(target=lambda: [store.update_task("t1", bump) for _ in range(10)])
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.load_tasks()["t1"]["count"] == 30, "an update undid another's"
    store.delete_task("t1")
    assert store.update_task("t1", bump) is None and store.load_tasks() == {}, "a deleted task came back"


def test_a_failure_stored_after_another_server_deleted_the_task_does_not_bring_it_back(stack, tmp_path):
    from types import SimpleNamespace
    root = f"cdc-cas-{uuid.uuid4().hex[:10]}"
    store = m.MySQLMetaStore(settings_for("mysql", stack, tmp_path, root).mysql, root)
    try:
        manager = object.__new__(m.ClusterTaskManager)  # only what the failure handler uses
        manager.store, manager.agent = store, SimpleNamespace(wake=lambda: None)
        ran = SimpleNamespace(task_id="t1", created_at=1.0)
        store.create_task("t1", {"task_id": "t1", "state": "Running", "reason": "", "created_at": 1.0})
        store.delete_task("t1")  # by another server, while this one's task was failing
        manager._on_failure(SimpleNamespace(task=ran, fence=None, waits=m.Waits()), "writing to the target: refused")
        assert store.load_tasks() == {}
        store.create_task("t1", {"task_id": "t1", "state": "Paused", "reason": "manually", "created_at": 1.0})
        manager._on_failure(SimpleNamespace(task=ran, fence=None, waits=m.Waits()), "writing to the target: refused")
        assert store.load_tasks()["t1"]["reason"] == "manually", "a pause made meanwhile was written over"
        store.save_task("t1", {"task_id": "t1", "state": "Running", "reason": "", "created_at": 1.0})
        manager._on_failure(SimpleNamespace(task=ran, fence=None, waits=m.Waits()), "writing to the target: refused")
        assert store.load_tasks()["t1"]["state"] == "Paused"
        assert store.load_tasks()["t1"]["reason"] == "writing to the target: refused"
    finally:
        store.close()


def test_the_checkpoints_of_many_tasks_go_in_few_transactions(opener):
    """Issue 17, item 16: a server with maxTaskNum busy tasks wrote one transaction per task and checkpoint
    interval; now the writes queued while one is under way go together in the next."""
    store = opener()
    transactions = []
    inner = store._save_positions

    def counted(writes):
        transactions.append(len(writes))
        time.sleep(0.02)  # a store under load: the others queue meanwhile
        return inner(writes)
    store._save_positions = counted
    errors = []

    def task(n: int):
        try:
            for round_ in range(5):
                store.save_checkpoints(f"t{n}", checkpoints((f"ch{n}", bytes([n, round_]), round_, "after")))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)
    threads = [threading.Thread(target=task, args=(n,)) for n in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sum(transactions) <= 500 and len(transactions) < 100, f"{len(transactions)} transactions for 500 saves"
    for n in range(100):
        assert store.load_checkpoints(f"t{n}")[f"ch{n}"].msg_id == bytes([n, 4]), "a task's last set is stored"


@pytest.mark.parametrize("kind", ["mysql", "etcd"])
def test_a_fence_that_fails_in_a_batch_stops_only_its_own_task(kind, stack, tmp_path):
    root = f"cdc-batch-{uuid.uuid4().hex[:10]}"
    store = m.open_meta_store(settings_for(kind, stack, tmp_path, root))
    try:
        lease = store.join("a", ttl=30.0)
        assert store.acquire(lease, "held")
        for task_id in ("t-held", "t-other", "t-gone"):
            store.save_task(task_id, {"task_id": task_id})
        store.delete_task("t-gone")
        outcomes = {}
        start = threading.Barrier(3)

        def save(task_id: str, target: str):
            start.wait()
            try:
                store.save_checkpoints(task_id, checkpoints(("ch", b"\x01", 1, "after")), fence=(lease, target))
                outcomes[task_id] = "written"
            except m.LeaseLost:
                outcomes[task_id] = "fenced off"
        threads = [threading.Thread(target=save, args=args) for args in
                   (("t-held", "held"), ("t-other", "not-held"), ("t-gone", "held"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert outcomes == {"t-held": "written", "t-other": "fenced off", "t-gone": "fenced off"}
        assert store.load_checkpoints("t-held") and not store.load_checkpoints("t-other")
        assert not store.load_checkpoints("t-gone")
    finally:
        store.close()
