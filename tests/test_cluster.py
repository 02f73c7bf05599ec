"""Several CDC servers, one set of tasks (real processes, real etcd and MariaDB, three real targets): every target
is held by one live server through a lease; any server answers for every task; when a holder dies its targets
move and resume from their checkpoints, nothing lost, nothing twice; a holder that stalls past its lease and
wakes writes nothing more."""
from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest

import milvus_cdc as m
from helpers import CdcServer, assert_same_rows, client, count_of, server_config, wait_until
from stack import ExtraTarget
from test_recovery import InsertLoad, loaded_collection

TTL = 4


@pytest.fixture(scope="module")
def targets(stack, tmp_path_factory):
    """Three targets: the stack's and two of their own."""
    extra = [ExtraTarget(stack, 0, workdir=tmp_path_factory.mktemp(f"target{i}")).start() for i in range(2)]
    yield [stack["target_milvus"]] + [t.uri for t in extra]
    for target in extra:
        target.stop()


def cluster_of(stack, tmp_path, store: str, count: int = 3, **overrides) -> list[CdcServer]:
    root = f"cdc-cluster-{uuid.uuid4().hex[:8]}"
    servers = []
    for i in range(count):
        workdir = tmp_path / f"server{i}"
        workdir.mkdir()
        config = server_config(stack, workdir, store=store, **{
            "cluster.enabled": True, "cluster.leaseTTL": TTL, "replication.checkpointInterval": 0.5,
            **overrides})
        config["metaStoreConfig"]["rootPath"] = root
        servers.append(CdcServer(config, workdir).start())
    return servers


def ready(server: CdcServer) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(server.url.removesuffix("/cdc") + "/readyz", timeout=5) as answer:
            return answer.status == 200
    except OSError:
        return False


def owners(server: CdcServer) -> dict[str, str]:
    return {t["task_id"]: t.get("owner") for t in server.call("list")["tasks"]}


def server_named(servers: list[CdcServer], server_id: str) -> CdcServer:
    return next(s for s in servers if s.config["address"] == server_id)


def loads(stack, names):
    return [InsertLoad(stack["source_milvus"], name, batch=100, pause=0.05) for name in names]


def finish_all(stack, servers, task_ids, names, target_uris):
    for name, uri in zip(names, target_uris, strict=True):
        source, target = client(stack["source_milvus"]), client(uri)
        wait_until(lambda t=target, n=name: t.has_collection(n) and
                   str(t.get_load_state(n)["state"]).endswith("Loaded"), 90, what=f"{name} loaded")
        rows = assert_same_rows(source, target, name, ["id", "s"], timeout=120)
        assert count_of(target, name) == len(rows), "count(*) equals the distinct keys: nothing twice"
    live = next(s for s in servers if s.alive())
    for task_id in task_ids:
        assert live.task(task_id)["state"] == "Running"


@pytest.mark.parametrize("store", ["etcd", "mysql"])
def test_three_servers_spread_the_targets_and_take_over_from_a_dead_one(stack, targets, tmp_path, unique_name, store):
    servers = cluster_of(stack, tmp_path, store)
    for server in servers:
        wait_until(lambda s=server: ready(s), 30, what="the servers to join")
    names = [unique_name("cl") for _ in targets]
    sources = [loaded_collection(stack, name)[0] for name in names]
    try:
        # Any server answers for every task: each task is made through another server.
        task_ids = [servers[i].create_task(uri, collections=[name])
                    for i, (uri, name) in enumerate(zip(targets, names, strict=True))]
        held = wait_until(lambda: (o := owners(servers[2])) and all(o.values()) and len(set(o.values())) == 3 and o,
                          30, what="the three targets spread over the three servers")
        assert owners(servers[0]) == held == owners(servers[1]), "every server shows the same owners"
        running = [load.__enter__() for load in loads(stack, names)]
        time.sleep(4)
        victim_id = held[task_ids[0]]
        victim = server_named(servers, victim_id)
        victim.kill()
        survivors = [s for s in servers if s is not victim]
        moved = wait_until(lambda: (o := owners(survivors[0]))[task_ids[0]] not in (None, victim_id) and o,
                           TTL + 15, interval=0.5, what="the dead server's target to move")
        assert moved[task_ids[0]] in {s.config["address"] for s in survivors}
        time.sleep(4)
        for load in running:
            load.__exit__(None, None, None)
        finish_all(stack, servers, task_ids, names, targets)
        # A pause and a resume through any server reach the task's holder.
        holder = server_named(servers, owners(survivors[0])[task_ids[1]])
        other = next(s for s in survivors if s is not holder)
        other.call("pause", task_id=task_ids[1])
        wait_until(lambda: holder.task(task_ids[1])["state"] == "Paused", 10, what="the pause on the holder")
        other.call("resume", task_id=task_ids[1])
        sources[1].insert(names[1], [{"id": 10 ** 9, "s": "after", "v": [0.5] * 4}])
        finish_all(stack, servers, task_ids[1:2], names[1:2], targets[1:2])
        for task_id in task_ids:
            survivors[0].call("delete", task_id=task_id)
        assert survivors[1].call("list")["tasks"] == []
    finally:
        for server in servers:
            server.stop()
        for source, name in zip(sources, names, strict=True):
            source.release_collection(name)
            source.drop_collection(name)


def test_a_holder_that_stalls_past_its_lease_writes_nothing_more(stack, targets, tmp_path, unique_name,
                                                                  monkeypatch):
    import pyetcd
    import milvus_cdc
    # Every target call waits 0.3 s before its fence check (a seam of TargetWriter): under the insert load the
    # holder's lanes always have calls made and not yet sent when it is stopped.
    monkeypatch.setenv(milvus_cdc.TargetWriter.HOLD_ENV, "0.3")
    servers = cluster_of(stack, tmp_path, "etcd", count=3, logLevel="debug")
    name = unique_name("stall")
    source = loaded_collection(stack, name)[0]
    host, port = stack["etcd"].split(":")
    etcd = pyetcd.client(host=host, port=int(port))
    try:
        for server in servers:  # both have joined: the share of the target does not change any more
            wait_until(lambda s=server: ready(s), 30, what="the servers to join")
        task_id = servers[0].create_task(targets[0], collections=[name])
        holder_id = wait_until(lambda: owners(servers[1])[task_id], 30, what="a holder")
        holder = server_named(servers, holder_id)
        others = [s for s in servers if s is not holder]
        key = f"{holder.config['metaStoreConfig']['rootPath']}/task_position/{task_id}"
        seen: list[int] = []  # the checkpoint timestamp of every write to the task's positions, in order

        def record(response):
            for event in getattr(response, "events", []):
                if event.value:
                    seen.append(max(c["timestamp"] for c in json.loads(event.value)))
        watch_id = etcd.add_watch_callback(key, record)
        with InsertLoad(stack["source_milvus"], name, batch=100, pause=0.05):
            time.sleep(3)
            os.kill(holder.proc.pid, signal.SIGSTOP)
            stopped_at = len(seen)
            try:
                wait_until(lambda: owners(others[0])[task_id] not in (None, holder_id), TTL + 15, interval=0.5,
                           what="another server to take over")
                time.sleep(3)
            finally:
                os.kill(holder.proc.pid, signal.SIGCONT)
            time.sleep(5)
        etcd.cancel_watch(watch_id)
        after = seen[stopped_at:]
        assert after == sorted(after), f"a stale write went back in time: {after}"
        woke = holder.log_text()
        assert "stops here" in woke or "lost its targets" in woke, "the woken holder stopped its task"
        assert "ran out: replicate" in woke, "a call in flight when the holder stalled was fenced off"
        rows = assert_same_rows(source, client(targets[0]), name, ["id"], timeout=90)
        assert count_of(client(targets[0]), name) == len(rows), "every row, once"
    finally:
        for server in servers:
            server.stop()
        etcd.close()
        source.release_collection(name)
        source.drop_collection(name)


def test_a_second_server_on_one_sqlite_file_is_refused(stack, tmp_path):
    first = CdcServer(server_config(stack, tmp_path), tmp_path).start()
    try:
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        config = server_config(stack, second_dir)
        config["metaStoreConfig"]["sqlitePath"] = first.config["metaStoreConfig"]["sqlitePath"]
        # the same tasks (another rootPath is another tenant, whose rows never meet these: allowed)
        config["metaStoreConfig"]["rootPath"] = first.config["metaStoreConfig"]["rootPath"]
        second = CdcServer(config, second_dir)
        import subprocess
        import sys
        from helpers import ROOT
        second.config_path.write_text(json.dumps(config))
        done = subprocess.run([sys.executable, str(ROOT / "milvus_cdc.py"), "-c", str(second.config_path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "another CDC server uses the sqlite meta store" in done.stderr, done
        assert "Traceback" not in done.stderr
    finally:
        first.stop()


# -- the agent's lease, with fakes: the faults here are timing ------------------------------------------------

class FakeClusterStore(m.LeaseStore):
    """One server's view of a store that grants everything and counts renewals (a LeaseStore: the agent needs no
    more)."""

    def __init__(self):
        self.renewals: list[tuple[float, frozenset]] = []
        self.held: set[str] = set()
        self.refuse_renewal = False

    def join(self, server_id, ttl):
        return m.Lease(server_id, f"{server_id}/1", ttl, time.monotonic())

    def renew(self, lease, targets=()):
        started = time.monotonic()
        self.renewals.append((started, frozenset(targets)))
        if self.refuse_renewal:
            return False
        lease.renewed_at = started
        return True

    def servers(self):
        return {"s1": "s1/1"}

    def owners(self):
        return {target: "s1" for target in self.held}

    def acquire(self, lease, target):
        self.held.add(target)
        return True

    def release(self, lease, target):
        self.held.discard(target)

    def leave(self, lease):
        pass


class StuckManager:
    """A task manager whose task takes long to start or stop (an applier in a call that waits its timeout)."""
    STOP_TIMEOUT = 5.0

    def __init__(self, stuck_for: float):
        from types import SimpleNamespace
        self.tasks = {"t1": SimpleNamespace(connect=SimpleNamespace(address="target-1"))}
        self.stuck_for = stuck_for
        self.synced: list[set] = []

    def stored_tasks(self):
        return self.tasks

    def sync(self, held, lease, tasks):
        self.synced.append(set(held))
        if held and len(self.synced) == 1 + sum(1 for s in self.synced[:-1] if not s):
            time.sleep(self.stuck_for)


def test_renewals_go_on_while_the_tasks_take_long_to_start_or_stop():
    """Issue 17, item 8: the agent renewed and synced tasks on one thread, so a task that took 30 s to stop
    starved the renewals and the server lost every target. The lease must stay valid all along."""
    store, manager = FakeClusterStore(), StuckManager(stuck_for=6.0)
    agent = m.ClusterAgent(manager, store, "s1", ttl=3.0)  # valid for 2 s after each renewal (Lease.MARGIN)
    agent.start()
    try:
        wait_until(lambda: manager.synced and manager.synced[-1], 5, what="the agent took the target")
        invalid = 0
        for _ in range(50):
            time.sleep(0.1)
            invalid += not agent.lease.valid()
        assert invalid == 0, "the lease ran out while a task was slow to start"
        assert len(store.renewals) >= 3
        assert store.renewals[-1][1] == {"target-1"}, "a renewal names the targets the server holds"
    finally:
        agent.stop()


def test_a_renewal_the_store_refuses_closes_the_fence_at_once_and_stops_the_tasks():
    store, manager = FakeClusterStore(), StuckManager(stuck_for=0.0)
    agent = m.ClusterAgent(manager, store, "s1", ttl=3.0)
    agent.start()
    try:
        wait_until(lambda: manager.synced and manager.synced[-1], 5, what="the agent took the target")
        lease = agent.lease
        store.refuse_renewal = True
        wait_until(lambda: lease.gone, 5, what="the refused renewal was noticed")
        assert not lease.valid(), "the fence is closed although the TTL has not run out locally"
        wait_until(lambda: set() in manager.synced[1:], 5, what="the tasks were stopped")
    finally:
        agent.stop()
