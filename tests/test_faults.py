"""Faults injected under a continuous insert load, on real servers: the meta store down (its own etcd frozen,
then killed and restarted; MySQL cut off), the source's etcd and broker frozen, the target cut off and
restarted, the CDC killed. Each is ridden out: the task stays Running, `get` says what it waits on, state in
memory and in the store agree, and at the end the target holds exactly the source's rows (count(*) equals the
distinct keys)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import CdcServer, TcpRelay, client, running_server, server_config, wait_until
from stack import free_ports
from test_recovery import InsertLoad, finish, loaded_collection


class PrivateEtcd:
    """An etcd of the test's own, to stop and freeze without touching the stack's."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.client_port, self.peer_port = free_ports(2)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> "PrivateEtcd":
        log = open(self.workdir / "etcd.log", "ab")
        self.proc = subprocess.Popen([
            shutil.which("etcd") or "/usr/bin/etcd", "--name", "meta", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", f"http://{self.address}", "--advertise-client-urls", f"http://{self.address}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", f"meta=http://127.0.0.1:{self.peer_port}"], stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def healthy():
            import pyetcd
            c = pyetcd.client(host="127.0.0.1", port=self.client_port, timeout=2)
            try:
                return bool(c.status().version)
            finally:
                c.close()
        wait_until(healthy, 30, interval=0.2, what="the meta store's etcd")
        return self

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.kill()


def stored_state(server: CdcServer, task_id: str) -> str:
    """The task's state as the store has it (read by a second server? no: straight from the store)."""
    meta = server.config["metaStoreConfig"]
    if meta["storeType"] == "etcd":
        import pyetcd
        host, port = meta["etcd"]["address"][0].removeprefix("http://").split(":")
        c = pyetcd.client(host=host, port=int(port), timeout=5)
        try:
            value, _ = c.get(f"{meta['rootPath']}/task_info/{task_id}")
        finally:
            c.close()
        return json.loads(value)["state"]
    import pymysql
    import milvus_cdc
    params = milvus_cdc.parse_mysql_dsn(meta["mysqlSourceUrl"])
    conn = pymysql.connect(**params)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT info FROM task_info WHERE root_path = %s AND task_id = %s", (meta["rootPath"], task_id))
            return json.loads(cur.fetchone()[0])["state"]
    finally:
        conn.close()


def during_the_outage(server: CdcServer, task_id: str, stack: dict) -> None:
    """While the store is away: get answers from memory and says what the task waits on; a change that must be
    stored is a 503 that changes nothing."""
    task = wait_until(lambda: (t := server.task(task_id)).get("retrying") and t, 40, interval=0.5,
                      what="get to show the wait on the meta store")
    assert task["state"] == "Running"
    assert any("meta store" in w["operation"] for w in task["retrying"]), task["retrying"]
    status, answer = server.post({"request_type": "pause", "request_data": {"task_id": task_id}})
    assert status == 503 and answer["code"] == 503 and "meta store" in answer["message"], answer
    assert server.task(task_id)["state"] == "Running"
    status, answer = server.post({"request_type": "create", "request_data": {
        "milvus_connect_param": {"uri": stack["target_milvus"], "connect_timeout": 5},
        "collection_infos": [{"name": "never_made"}]}})
    assert status in (400, 503) and answer["code"] == status, answer  # (400: it overlaps the `*` task)
    assert [t["task_id"] for t in server.call("list")["tasks"]] == [task_id]


def after_the_outage(server: CdcServer, task_id: str) -> None:
    wait_until(lambda: "retrying" not in server.task(task_id), 60, what="the task to move on by itself")
    # the pause answered 503 may have landed in the store once it ran again: the server writes back what it
    # holds within one retry wait (retryMaxBackoff)
    wait_until(lambda: stored_state(server, task_id) == "Running", 30, interval=0.5,
               what="the store to hold the task as the server does")
    assert server.task(task_id)["state"] == "Running"
    server.call("pause", task_id=task_id)
    assert server.task(task_id)["state"] == "Paused" == stored_state(server, task_id)
    server.call("resume", task_id=task_id)
    assert server.task(task_id)["state"] == "Running" == stored_state(server, task_id)


def test_an_etcd_meta_store_frozen_then_killed_and_restarted(stack, tmp_path, unique_name):
    etcd = PrivateEtcd(tmp_path).start()
    config = server_config(stack, tmp_path, store="etcd", **{"replication.retryTimeout": 5})
    config["metaStoreConfig"]["etcd"] = {"address": [f"http://{etcd.address}"]}
    server = CdcServer(config, tmp_path).start()
    try:
        task_id = server.create_task(stack["target_milvus"])
        name = unique_name("metaetcd")
        source, target = loaded_collection(stack, name)
        with InsertLoad(stack["source_milvus"], name):
            time.sleep(3)
            etcd.freeze()  # longer than retryTimeout: the store's faults never pause a task
            during_the_outage(server, task_id, stack)
            time.sleep(12)
            etcd.thaw()
            after_the_outage(server, task_id)
            etcd.kill()
            during_the_outage(server, task_id, stack)
            time.sleep(12)
            etcd.start()
            after_the_outage(server, task_id)
            time.sleep(2)
        finish(stack, source, target, name, server, task_id)
        assert "Traceback" not in server.log_text() or "api: internal error" not in server.log_text()
        server.call("delete", task_id=task_id)
    finally:
        server.stop()
        etcd.stop()


def test_a_mysql_meta_store_cut_off(stack, tmp_path, unique_name):
    my = stack["mysql"]
    relay = TcpRelay(f"{my['host']}:{my['port']}")
    config = server_config(stack, tmp_path, store="mysql", **{"replication.retryTimeout": 5})
    config["metaStoreConfig"]["mysqlSourceUrl"] = \
        f"{my['user']}:{my['password']}@tcp(127.0.0.1:{relay.port})/{my['database']}"
    server = CdcServer(config, tmp_path).start()
    try:
        task_id = server.create_task(stack["target_milvus"])
        name = unique_name("metamysql")
        source, target = loaded_collection(stack, name)
        with InsertLoad(stack["source_milvus"], name):
            time.sleep(3)
            relay.cut()
            during_the_outage(server, task_id, stack)
            time.sleep(10)
            relay.restore()
            after_the_outage(server, task_id)
            time.sleep(2)
        finish(stack, source, target, name, server, task_id)
        server.call("delete", task_id=task_id)
    finally:
        server.stop()
        relay.cut()


def freeze(stack: dict, part: str, seconds: float) -> None:
    """SIGSTOP a part of the stack for a while (a stalled server: connections stay open, nothing answers)."""
    pid = stack["pids"][part]
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def patient(stack, tmp_path):
    """A server whose tasks wait out a minute of trouble."""
    with running_server(stack, tmp_path, **{"replication.retryTimeout": 120, "replication.retryMaxBackoff": 2}) as s:
        yield s


def test_the_source_etcd_and_broker_frozen(stack, patient, unique_name):
    if "pids" not in stack:
        pytest.skip("the stack's state has no pids (started by an older stack.py)")
    server = patient
    task_id = server.create_task(stack["target_milvus"])
    name = unique_name("frozen")
    source, target = loaded_collection(stack, name)
    load = InsertLoad(stack["source_milvus"], name)
    with contextlib.suppress(AssertionError), load:  # inserts that time out during a freeze are allowed
        time.sleep(3)
        freeze(stack, "etcd", 8)
        time.sleep(3)
        freeze(stack, "kafka", 15)
        time.sleep(3)
    assert server.task(task_id)["state"] == "Running", server.task(task_id).get("reason")
    finish(stack, source, target, name, server, task_id)


def test_the_target_killed_and_restarted(stack, patient, tmp_path, unique_name):
    from stack import ExtraTarget
    server = patient
    extra = ExtraTarget(stack, 0, workdir=tmp_path / "extra").start()
    try:
        task_id = server.create_task(extra.uri)
        name = unique_name("restarted")
        source, _ = loaded_collection(stack, name)
        with InsertLoad(stack["source_milvus"], name):
            time.sleep(3)
            extra.kill()
            time.sleep(20)
            assert server.task(task_id)["state"] == "Running"
            assert server.task(task_id).get("retrying"), "get says what the task waits on"
            extra.restart()
            back = time.monotonic()
            time.sleep(3)
        wait_until(lambda: "retrying" not in server.task(task_id), 30, interval=0.2, what="the task to move on")
        caught_up = time.monotonic() - back
        print(f"\ncaught up {caught_up:.1f}s after the target answered again")
        finish(stack, source, client(extra.uri), name, server, task_id)
        assert caught_up < 30
    finally:
        extra.stop()


def test_the_cdc_killed_mid_stream(stack, tmp_path, unique_name):
    """kill -9 of the CDC itself, twice, under load (test_recovery covers more rounds with a slow checkpoint)."""
    server = CdcServer(server_config(stack, tmp_path), tmp_path).start()
    try:
        task_id = server.create_task(stack["target_milvus"])
        name = unique_name("cdckill")
        source, target = loaded_collection(stack, name)
        with InsertLoad(stack["source_milvus"], name):
            for _ in range(2):
                time.sleep(2)
                server.kill()
                time.sleep(1)
                server.start()
            time.sleep(2)
        finish(stack, source, target, name, server, task_id)
        server.call("delete", task_id=task_id)
    finally:
        server.stop()
