"""The /cdc API through real HTTP against a running server and the stack's real target Milvus.

Tasks here name collections that do not exist, so they replicate nothing while their lifecycle is exercised.
"""
from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import CdcServer, server_config

TOKEN = "root:S3cr3t-Token-XYZ"


@pytest.fixture(scope="module")
def api(stack, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("api")
    server = CdcServer(server_config(stack, workdir, maxTaskNum=6, maxNameLength=40), workdir).start()
    yield server
    server.stop()


@pytest.fixture
def cleanup(api):
    """Deletes the tasks a test created, keeping the server's task list as the test found it."""
    before = {t["task_id"] for t in api.call("list")["tasks"]}
    yield
    for task in api.call("list")["tasks"]:
        if task["task_id"] not in before:
            api.call("delete", task_id=task["task_id"])


def name() -> str:
    return f"api_{uuid.uuid4().hex[:12]}"


def create_body(uri: str, names=None, **param) -> dict:
    return {"request_type": "create", "request_data": {
        "milvus_connect_param": {"uri": uri, "token": TOKEN, "connect_timeout": 10, **param},
        "collection_infos": [{"name": n} for n in (names or [name()])]}}


def refused(server: CdcServer, body, status: int, *needles: str, method: str = "POST") -> dict:
    """The request fails with `status`, the same code in a JSON body, a message saying what to fix."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, text = server.raw(raw, method=method)
    assert got == status, (got, text)
    answer = json.loads(text)
    assert answer["code"] == status and answer["message"], answer
    assert "Traceback" not in text.decode()
    for needle in needles:
        assert needle in answer["message"], answer["message"]
    return answer


# ---------------------------------------------------------------------------------------------------------
# Every request type
# ---------------------------------------------------------------------------------------------------------

def test_every_request_type_with_the_seed_shapes(api, stack, cleanup):
    collections = [name(), f"apidb.{name()}"]
    status, answer = api.post(create_body(stack["target_milvus"], collections))
    assert status == 200 and answer["code"] == 200, answer
    task_id = answer["data"]["task_id"]
    assert len(task_id) == 32 and int(task_id, 16) >= 0

    listed = [t for t in api.call("list")["tasks"] if t["task_id"] == task_id]
    assert listed == [{"task_id": task_id, "milvus_connect_param": {"uri": stack["target_milvus"],
                                                                   "connect_timeout": 10.0},
                       "collection_infos": [{"name": n} for n in collections], "state": "Running"}]
    task = api.task(task_id)
    assert task["state"] == "Running" and "reason" not in task and isinstance(task["channels"], list)
    assert task["collection_infos"] == [{"name": n} for n in collections]

    assert api.call("pause", task_id=task_id) == {}
    task = api.task(task_id)
    assert task["state"] == "Paused" and task["reason"] == "manually pause through http interface"
    positions = api.call("position", task_id=task_id)
    assert positions["task_id"] == task_id
    # no collection of the task exists: only the replicate channel has a position (the Go CDC's op_positions)
    assert positions["positions"] == [] and positions["target_positions"] == []
    assert [p["channel_name"] for p in positions["op_positions"]] == ["by-dev-replicate-msg"]
    assert all(set(p) == {"collection_id", "channel_name", "channel", "msg_id", "time", "tt", "timestamp",
                          "resume"} for p in positions["op_positions"])

    assert api.call("resume", task_id=task_id) == {}
    task = api.task(task_id)
    assert task["state"] == "Running" and "reason" not in task

    assert api.call("delete", task_id=task_id) == {}
    assert task_id not in [t["task_id"] for t in api.call("list")["tasks"]]
    refused(api, {"request_type": "get", "request_data": {"task_id": task_id}}, 404, "not found the task")
    refused(api, {"request_type": "position", "request_data": {"task_id": task_id}}, 404)


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------

def broken_creates(uri: str, tmp_path):
    """(request_data, a word the message must contain) for every check of create."""
    good = {"uri": uri, "token": TOKEN, "connect_timeout": 10}
    infos = [{"name": name()}]
    pem = tmp_path / "server.pem"
    pem.write_text("not really a certificate")
    return [
        ({"milvus_connect_param": good}, "collection_infos"),
        ({"milvus_connect_param": good, "collection_infos": []}, "collection_infos"),
        ({"milvus_connect_param": good, "collection_infos": [{"name": "*"}, {"name": "a"}]}, "alone"),
        ({"milvus_connect_param": good, "collection_infos": [{"name": "dup"}, {"name": "dup"}]}, "twice"),
        ({"milvus_connect_param": good, "collection_infos": [{"name": "x" * 41}]}, "maxNameLength"),
        ({"milvus_connect_param": good, "collection_infos": [{"name": "bad-name!"}]}, "not a collection name"),
        ({"milvus_connect_param": good, "collection_infos": [{"name": 5}]}, "collection_infos[0]"),
        ({"milvus_connect_param": good, "collection_infos": [{"name": "a", "extra": 1}]}, "collection_infos[0]"),
        ({"milvus_connect_param": good, "collection_infos": "*"}, "collection_infos"),
        ({"collection_infos": infos}, "milvus_connect_param"),
        ({"milvus_connect_param": {"token": TOKEN}, "collection_infos": infos}, "uri"),
        ({"milvus_connect_param": {**good, "uri": "ftp://h:1"}, "collection_infos": infos}, "uri"),
        ({"milvus_connect_param": {**good, "uri": "http://:19530"}, "collection_infos": infos}, "uri"),
        ({"milvus_connect_param": {**good, "uri": "http://h:99999"}, "collection_infos": infos}, "port"),
        ({"milvus_connect_param": {**good, "connect_timeout": -1}, "collection_infos": infos}, "connect_timeout"),
        ({"milvus_connect_param": {**good, "connect_timeout": "10"}, "collection_infos": infos}, "connect_timeout"),
        ({"milvus_connect_param": {**good, "connect_timeout": True}, "collection_infos": infos}, "connect_timeout"),
        ({"milvus_connect_param": {**good, "token": 123}, "collection_infos": infos}, "token"),
        ({"milvus_connect_param": {**good, "dial_config": {"server_pem_path": "/no/such.pem"}},
          "collection_infos": infos}, "cannot load a PEM file from the path named there"),
        ({"milvus_connect_param": {**good, "dial_config": {"pem": str(pem)}}, "collection_infos": infos},
         "dial_config.pem"),
        ({"milvus_connect_param": {**good, "dial_config": {"client_pem_path": str(pem)}},
          "collection_infos": infos}, "client_key_path"),
        ({"milvus_connect_param": {**good, "host": "h"}, "collection_infos": infos}, "different servers"),
        ({"milvus_connect_param": good, "collection_infos": infos, "extra": 1}, "request_data.extra"),
        ({"milvus_connect_param": good, "collection_infos": infos, "replay_existing": "yes"}, "replay_existing"),
        ("not an object", "request_data"),
    ]


def test_create_checks_every_field(api, stack, tmp_path, cleanup):
    before = api.call("list")
    for data, needle in broken_creates(stack["target_milvus"], tmp_path):
        refused(api, {"request_type": "create", "request_data": data}, 400, needle)
    assert api.call("list") == before


def test_no_answer_tells_whether_a_file_exists_on_the_server(api, stack, tmp_path, cleanup):
    """A dial_config path that does not exist and one that is not a certificate get the same answer."""
    pem = tmp_path / "server.pem"
    pem.write_text("not really a certificate")
    answers = []
    for path in ("/no/such/file.pem", str(pem), "/etc/hostname"):
        body = create_body(stack["target_milvus"], dial_config={"server_name": "localhost", "server_pem_path": path})
        answers.append(refused(api, body, 400, "server_pem_path")["message"])
    assert len(set(answers)) == 1, answers
    assert "/no/such" not in answers[0] and str(pem) not in answers[0]


def test_an_unreachable_target_and_a_target_with_ticks_on_are_refused(api, stack, cleanup):
    refused(api, create_body("http://127.0.0.1:1", connect_timeout=1), 400, "cannot reach")
    refused(api, create_body(stack["source_milvus"]), 400, "ttMsgEnabled")
    assert api.call("list")["tasks"] == []


def test_overlapping_tasks_to_one_target_are_refused(api, stack, cleanup):
    shared = name()
    api.create_task(stack["target_milvus"], collections=[shared, name()])
    refused(api, create_body(stack["target_milvus"], [name(), shared]), 400, "already replicates")
    refused(api, create_body(stack["target_milvus"], [f"default.{shared}"]), 400, "already replicates")
    refused(api, create_body(stack["target_milvus"], ["*"]), 400, "already replicates")
    api.create_task(stack["target_milvus"], collections=[name()])  # other names: accepted
    assert len(api.call("list")["tasks"]) == 2


def test_max_task_num(stack, tmp_path):
    server = CdcServer(server_config(stack, tmp_path, maxTaskNum=2), tmp_path).start()
    try:
        for _ in range(2):
            server.create_task(stack["target_milvus"], collections=[name()])
        refused(server, create_body(stack["target_milvus"]), 400, "maxTaskNum")
    finally:
        server.stop()


def test_state_changes_that_do_not_apply(api, stack, cleanup):
    task_id = api.create_task(stack["target_milvus"], collections=[name()])
    refused(api, {"request_type": "resume", "request_data": {"task_id": task_id}}, 400, "already running")
    api.call("pause", task_id=task_id)
    refused(api, {"request_type": "pause", "request_data": {"task_id": task_id}}, 400, "already paused")
    assert api.task(task_id)["state"] == "Paused"


@pytest.mark.parametrize("request_type", ["get", "pause", "resume", "delete", "position"])
def test_unknown_and_missing_task_ids(api, request_type):
    refused(api, {"request_type": request_type, "request_data": {"task_id": "0" * 32}}, 404, "not found the task")
    refused(api, {"request_type": request_type, "request_data": {}}, 400, "task_id")
    refused(api, {"request_type": request_type}, 400, "task_id")
    refused(api, {"request_type": request_type, "request_data": {"task_id": 7}}, 400, "task_id")


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"list"', "JSON object"),
    (b"{}", "request_type"),
    (b'{"request_type": "explode"}', "request_type"),
    (b'{"request_type": "list", "extra": 1}', "unknown field"),
    (b'{"request_type": "list", "request_data": [1]}', "list takes no request_data"),
])
def test_malformed_bodies(api, body, needle):
    refused(api, body, 400, needle)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_and_paths(api, method):
    refused(api, b'{"request_type": "list"}', 405, "POST", method=method)


def test_another_path_is_a_json_404(api):
    api_url = api.url
    try:
        api.url = api_url.replace("/cdc", "/other")
        refused(api, b'{"request_type": "list"}', 404)
    finally:
        api.url = api_url


# ---------------------------------------------------------------------------------------------------------
# Restarts and secrets
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["stop", "kill"])
def test_tasks_come_back_in_their_state_after_a_restart(stack, tmp_path, how):
    server = CdcServer(server_config(stack, tmp_path), tmp_path).start()
    try:
        running = server.create_task(stack["target_milvus"], collections=[name()])
        paused = server.create_task(stack["target_milvus"], collections=[name()])
        server.call("pause", task_id=paused)
        before = sorted(server.call("list")["tasks"], key=lambda t: t["task_id"])
        getattr(server, how)()
        server.start()
        after = sorted(server.call("list")["tasks"], key=lambda t: t["task_id"])
        assert after == before
        assert server.task(running)["state"] == "Running"
        assert server.task(paused)["reason"] == "manually pause through http interface"
        server.call("resume", task_id=paused)  # and it still works
        assert server.task(paused)["state"] == "Running"
    finally:
        server.stop()


def test_the_token_is_never_shown_nor_logged(api, stack, cleanup):
    task_ids = []
    for _ in range(2):
        status, raw = api.raw(json.dumps(create_body(stack["target_milvus"])).encode())
        assert status == 200, raw
        task_ids.append(json.loads(raw)["data"]["task_id"])
    api.call("pause", task_id=task_ids[1])
    api.call("resume", task_id=task_ids[1])
    for request in [{"request_type": "list"}] + [{"request_type": kind, "request_data": {"task_id": task_id}}
                                                 for kind in ("get", "position") for task_id in task_ids]:
        status, raw = api.raw(json.dumps(request).encode())
        assert status == 200 and b"S3cr3t" not in raw, raw
    assert "S3cr3t" not in api.log_text()


# ---------------------------------------------------------------------------------------------------------
# Fuzz: malformed requests never succeed, never crash the server, never change its tasks
# ---------------------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)
unreachable_param = st.fixed_dictionaries({"uri": st.just("http://127.0.0.1:1"), "connect_timeout": st.just(0.2)},
                                          optional={"token": json_values, "dial_config": json_values})
create_data = st.fixed_dictionaries({}, optional={
    "milvus_connect_param": st.one_of(json_values, unreachable_param),
    "collection_infos": st.one_of(json_values, st.lists(st.fixed_dictionaries({"name": st.text(max_size=50)}),
                                                        max_size=3)),
    "replay_existing": json_values})
structured = st.one_of(
    st.fixed_dictionaries({"request_type": st.just("create")}, optional={"request_data": create_data}),
    st.fixed_dictionaries({"request_type": st.sampled_from(["get", "pause", "resume", "delete", "position"])},
                          optional={"request_data": st.one_of(json_values, st.fixed_dictionaries(
                              {"task_id": json_values}))}),
    st.fixed_dictionaries({"request_type": st.just("list"),
                           "request_data": json_values.filter(lambda v: v not in (None, {}))}),
    st.fixed_dictionaries({"request_type": json_values.filter(lambda v: v not in ("list",))},
                          optional={"request_data": json_values}),
)
requests = st.one_of(
    st.tuples(st.just("POST"), st.binary(max_size=200)),
    st.tuples(st.just("POST"), json_values.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just("POST"), structured.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]), st.binary(max_size=50)),
)


def test_fuzzed_requests_never_succeed_nor_change_the_tasks(api, stack):
    keep = api.create_task(stack["target_milvus"], collections=[name()])
    before = api.call("list")
    seen = [0]

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests)
    def check(request):
        method, body = request
        status, raw = api.raw(body, method=method)
        assert status != 200, (method, body, raw)
        answer = json.loads(raw)
        assert answer["code"] == status and answer["message"] and "Traceback" not in raw.decode()
        seen[0] += 1
        if seen[0] % 100 == 0:
            assert api.alive() and api.call("list") == before

    check()
    assert seen[0] >= 500
    assert api.alive() and api.call("list") == before
    api.call("delete", task_id=keep)


# ---------------------------------------------------------------------------------------------------------
# Safe to expose: an API token, bounded work per request, limits
# ---------------------------------------------------------------------------------------------------------

API_TOKEN = "a-long-api-token-0123456789"


@pytest.fixture(scope="module")
def locked(stack, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("locked")
    server = CdcServer(server_config(stack, workdir, apiToken=API_TOKEN), workdir)
    server.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_TOKEN}"}
    yield server.start()
    server.stop()


def test_with_an_api_token_a_request_without_it_gets_401_and_changes_nothing(locked, stack):
    task_id = locked.create_task(stack["target_milvus"], collections=[name()])
    before = locked.call("list")
    body = json.dumps({"request_type": "delete", "request_data": {"task_id": task_id}}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": API_TOKEN},
                    {"Authorization": f"Basic {API_TOKEN}"}):
        status, text = locked.raw(body, headers={"Content-Type": "application/json", **headers})
        answer = json.loads(text)
        assert status == 401 and answer["code"] == 401 and "Authorization: Bearer" in answer["message"], answer
    assert locked.call("list") == before
    locked.call("delete", task_id=task_id)
    assert API_TOKEN not in locked.log_text()


def test_deeply_nested_json_is_a_400(api):
    deep = b'{"request_type": "list", "request_data": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    refused(api, deep, 400, "nested too deeply")
    assert "Traceback" not in api.log_text()


class BlackHole:
    """A TCP port that accepts connections and never answers: a target that hangs."""

    def __init__(self):
        import socket
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.held: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_storm_of_creates_against_a_hanging_target_does_not_delay_list(api, cleanup):
    import threading
    import time
    hole = BlackHole()
    answers: list[int] = []
    storm = [threading.Thread(target=lambda: answers.append(api.post(create_body(
        f"http://127.0.0.1:{hole.port}", connect_timeout=20))[0])) for _ in range(12)]
    try:
        for thread in storm:
            thread.start()
        time.sleep(1)
        slowest = 0.0
        for _ in range(10):
            started = time.monotonic()
            api.call("list")
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.2)
        assert slowest < 1.0, f"list took {slowest:.2f}s during the storm"
    finally:
        for thread in storm:
            thread.join(60)
        hole.close()
    assert sorted(set(answers)) == [400, 503], answers  # the probes that ran timed out; the rest were told to wait
