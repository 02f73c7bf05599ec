"""``create`` against a target that serves TLS and checks tokens, through a real CDC server.

The target is a Milvus 2.3.5 with ``common.security.tlsMode`` 1 (one-way) or 2 (mutual) and
``common.security.authorizationEnabled`` (``stack.ExtraTarget``), started for one class of tests at a time and
stopped after it; the certificates are made at run time (``tls_certs.make_certs``). Well-configured tasks
replicate end to end; every mistake in the TLS or auth settings is a 400 whose message names the cause, and
leaves the server up and its task list as it was.
"""
from __future__ import annotations

import re
import time
import uuid

import pytest
from pymilvus import DataType, MilvusClient

from helpers import CdcServer, assert_same_rows, client, server_config, tls_client, wait_until
from stack import ExtraTarget
from tls_certs import SERVER_NAME, make_certs
from test_verify import verified

TOKEN = "root:Milvus"
CONNECT_TIMEOUT = 5
WRONG_NAME = "milvus.example"  # a server_name the server's certificate does not hold


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict:
    return make_certs(tmp_path_factory.mktemp("material"))


@pytest.fixture(scope="module")
def cdc(stack, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tlscdc")
    server = CdcServer(server_config(stack, workdir), workdir).start()
    yield server
    server.stop()


@pytest.fixture
def cleanup(cdc):
    """Deletes any task a test created (a create that should have been refused included)."""
    before = {t["task_id"] for t in cdc.call("list")["tasks"]}
    yield
    for task in cdc.call("list")["tasks"]:
        if task["task_id"] not in before:
            cdc.call("delete", task_id=task["task_id"])


def start_target(stack: dict, certs: dict, mode: int):
    target = ExtraTarget(stack, mode, certs).start()
    print(f"\nTLS target (tlsMode {mode}) up at {target.uri} in {target.start_seconds:.1f}s")
    return target


def create_body(uri: str, dial_config: dict | None = None, token: str = TOKEN, names=None) -> dict:
    param = {"uri": uri, "token": token, "connect_timeout": CONNECT_TIMEOUT}
    if dial_config is not None:
        param["dial_config"] = dial_config
    return {"request_type": "create", "request_data": {
        "milvus_connect_param": param,
        "collection_infos": [{"name": n} for n in (names or [f"tls_{uuid.uuid4().hex[:10]}"])]}}


def one_way(certs: dict, **change) -> dict:
    return {"server_name": SERVER_NAME, "server_pem_path": certs["server_pem"], **change}


def mutual(certs: dict, **change) -> dict:
    dial = {"server_name": SERVER_NAME, "ca_pem_path": certs["ca_pem"], "client_pem_path": certs["client_pem"],
            "client_key_path": certs["client_key"], **change}
    return {k: v for k, v in dial.items() if v is not None}


def refused(cdc: CdcServer, body: dict, certs: dict, *patterns: str) -> str:
    """``create`` answers 400 in bounded time, the server stays up without a new task, and the message, with
    the request's uri and file paths taken out (so they cannot match by accident), matches every pattern
    (case-insensitive regular expressions)."""
    before = [t["task_id"] for t in cdc.call("list")["tasks"]]
    began = time.monotonic()
    status, answer = cdc.post(body)
    took = time.monotonic() - began
    assert status == 400 and answer["code"] == 400, (status, answer)
    message = answer["message"]
    print(f"\ncreate refused in {took:.1f}s: {message}")
    assert message and "Traceback" not in message, answer
    token = body["request_data"]["milvus_connect_param"].get("token")
    assert not token or token not in message, "the message shows the token"
    assert took < CONNECT_TIMEOUT + 20, f"create took {took:.1f}s to refuse"
    assert cdc.alive(), cdc.log_text()[-3000:]
    assert [t["task_id"] for t in cdc.call("list")["tasks"]] == before, "a refused create left a task"
    uri = body["request_data"]["milvus_connect_param"]["uri"]
    bare = message.replace(uri, "<uri>")
    for path in sorted(certs.values(), key=len, reverse=True):
        bare = bare.replace(path, "<file>")
    for pattern in patterns:
        assert re.search(pattern, bare, re.IGNORECASE), f"{pattern!r} not in the message: {message!r}"
    return message


# ---------------------------------------------------------------------------------------------------------
# End to end over TLS
# ---------------------------------------------------------------------------------------------------------

def replicate_over_tls(cdc: CdcServer, stack: dict, uri: str, dial_config: dict, client_tls: dict) -> None:
    """A task over TLS is created; a collection made on the source shows up with its rows on the target."""
    name = f"tls_{uuid.uuid4().hex[:10]}"
    body = create_body(uri, dial_config, names=[name])
    task_id = cdc.call("create", **body["request_data"])["task_id"]
    source = client(stack["source_milvus"])
    target = tls_client(uri, TOKEN, **client_tls)
    try:
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("s", DataType.VARCHAR, max_length=32)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
        source.create_collection(name, schema=schema, shards_num=1)
        params = source.prepare_index_params()
        params.add_index("v", index_type="FLAT", metric_type="L2")
        source.create_index(name, params)
        source.load_collection(name)
        source.insert(name, [{"id": i, "s": f"row-{i}", "v": [i / 7, 1.0, 0.5, -i / 3]} for i in range(200)])
        source.delete(name, ids=[5, 6, 7])
        wait_until(lambda: target.has_collection(name), 60, what=f"{name} on the TLS target")
        assert_same_rows(source, target, name, ["id", "s", "v"], timeout=90)
        task = cdc.task(task_id)
        assert task["state"] == "Running", task
        # verify reads the TLS target with the task's own dial_config
        result = verified(cdc, task_id, sample_vectors=20)
        assert result["state"] == "equal" and result["rows_compared"] >= 197, result
    finally:
        cdc.call("delete", task_id=task_id)
        source.drop_collection(name)
        target.close()  # its own connection; the source's is shared with other tests (helpers.client)


# ---------------------------------------------------------------------------------------------------------
# One-way TLS (tlsMode 1)
# ---------------------------------------------------------------------------------------------------------

class TestOneWay:
    @pytest.fixture(scope="class")
    def target(self, stack, certs):
        target = start_target(stack, certs, 1)
        yield target
        target.stop()

    def test_the_target_demands_tls_and_a_token(self, target, certs):
        trusted = tls_client(target.uri, TOKEN, server_pem_path=certs["ca_pem"], server_name=SERVER_NAME)
        assert isinstance(trusted.list_collections(), list)
        trusted.close()
        with pytest.raises(Exception, match="(?i)fail connecting|unavailable"):
            tls_client(f"http://localhost:{target.port}", TOKEN, timeout=5)
        with pytest.raises(Exception, match="(?i)auth"):
            tls_client(target.uri, "root:wrong-password", server_pem_path=certs["ca_pem"], server_name=SERVER_NAME)

    def test_a_one_way_task_replicates(self, cdc, stack, target, certs, cleanup):
        replicate_over_tls(cdc, stack, target.uri, one_way(certs),
                           {"server_pem_path": certs["server_pem"], "server_name": SERVER_NAME})

    def test_wrong_ca(self, cdc, target, certs, cleanup):
        refused(cdc, create_body(target.uri, one_way(certs, server_pem_path=certs["other_ca_pem"])), certs,
                r"certificate", r"verif|trust|issuer|\bCA\b|signed")

    def test_server_name_not_in_the_certificate(self, cdc, target, certs, cleanup):
        refused(cdc, create_body(target.uri, one_way(certs, server_name=WRONG_NAME)), certs,
                r"server.?name|host.?name", r"certificate|verif|match")

    def test_server_pem_path_that_is_not_a_certificate(self, cdc, target, certs, cleanup):
        refused(cdc, create_body(target.uri, one_way(certs, server_pem_path=certs["not_a_cert"])), certs,
                r"certificate|server_pem_path",
                r"\bnot an?\b|\bno\b|invalid|\bload|\bread\b|unreadable|\bparse|\bPEM\b")

    def test_plain_http_to_a_tls_target(self, cdc, target, certs, cleanup):
        refused(cdc, create_body(f"http://localhost:{target.port}"), certs, r"\bTLS\b|\bSSL\b|https")

    def test_wrong_token(self, cdc, target, certs, cleanup):
        message = refused(cdc, create_body(target.uri, one_way(certs), token="root:wrong-password"), certs,
                          r"token|auth|credential|password")
        assert "wrong-password" not in message


# ---------------------------------------------------------------------------------------------------------
# Mutual TLS (tlsMode 2)
# ---------------------------------------------------------------------------------------------------------

class TestMutual:
    @pytest.fixture(scope="class")
    def target(self, stack, certs):
        target = start_target(stack, certs, 2)
        yield target
        target.stop()

    def test_the_target_demands_a_client_certificate(self, target, certs):
        with pytest.raises(Exception, match="(?i)fail connecting|unavailable"):
            tls_client(target.uri, TOKEN, timeout=5, server_pem_path=certs["ca_pem"], server_name=SERVER_NAME)
        with pytest.raises(Exception, match="(?i)fail connecting|unavailable"):
            tls_client(f"http://localhost:{target.port}", TOKEN, timeout=5)
        trusted = tls_client(target.uri, TOKEN, ca_pem_path=certs["ca_pem"], client_pem_path=certs["client_pem"],
                             client_key_path=certs["client_key"], server_name=SERVER_NAME)
        assert isinstance(trusted.list_collections(), list)
        trusted.close()

    def test_a_mutual_task_replicates(self, cdc, stack, target, certs, cleanup):
        replicate_over_tls(cdc, stack, target.uri, mutual(certs),
                           {"ca_pem_path": certs["ca_pem"], "client_pem_path": certs["client_pem"],
                            "client_key_path": certs["client_key"], "server_name": SERVER_NAME})

    def test_missing_client_certificate(self, cdc, target, certs, cleanup):
        refused(cdc, create_body(target.uri, mutual(certs, client_pem_path=None, client_key_path=None)), certs,
                r"client.?cert|client_pem_path",
                r"requir|\bneed|\bask|demand|missing|\bno\b|without|mutual|two-way")  # none was given

    def test_unreadable_client_key(self, cdc, target, certs, cleanup):
        refused(cdc, create_body(target.uri, mutual(certs, client_key_path=certs["bad_key"])), certs,
                r"client.?key|private key|client_key_path")


# ---------------------------------------------------------------------------------------------------------
# TLS to a target that does not serve it (the stack's own target)
# ---------------------------------------------------------------------------------------------------------

def test_https_to_a_plain_target(cdc, stack, certs, cleanup):
    port = stack["target_milvus"].rsplit(":", 1)[1]
    refused(cdc, create_body(f"https://localhost:{port}", one_way(certs)), certs,
            r"\bTLS\b|\bSSL\b", r"\bplain\b|http://|\bnot\b|n't|\bwithout\b|\bno\b|wrong version")
