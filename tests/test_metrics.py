"""GET /metrics (Prometheus text, read back with prometheus_client's parser), /healthz and /readyz, during a real
replication."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import CdcServer, TcpRelay, running_server, server_config, wait_until
from test_faults import PrivateEtcd
from test_recovery import loaded_collection


def scrape(server: CdcServer) -> dict[tuple, float]:
    """Every sample as {(name, sorted labels): value}."""
    with urllib.request.urlopen(server.url.removesuffix("/cdc") + "/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def probe(server: CdcServer, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url.removesuffix("/cdc") + path, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def server(stack, tmp_path):
    with running_server(stack, tmp_path, **{"replication.retryTimeout": 60, "replication.retryMaxBackoff": 1}) as s:
        yield s


def test_metrics_follow_a_real_replication(stack, server, unique_name):
    relay = TcpRelay(stack["target_milvus"])
    name = unique_name("metrics")
    task_id = server.create_task(relay.uri, collections=[name])
    source, target = loaded_collection(stack, name, shards=2)
    wait_until(lambda: target.has_collection(name), 60, what="the copy")
    before = scrape(server)
    rows = [{"id": i, "s": f"m{i}", "v": [0.5] * 4} for i in range(777)]
    for start in range(0, len(rows), 100):
        source.insert(name, rows[start:start + 100])
    source.delete(name, ids=[1, 2, 3])
    qualified = f"default.{name}"
    inserted = lambda: value(scrape(server), "milvus_cdc_replicated_rows_total", task_id=task_id,  # noqa: E731
                             collection=qualified, op="insert")
    wait_until(lambda: inserted() - value(before, "milvus_cdc_replicated_rows_total", task_id=task_id,
                                          collection=qualified, op="insert") == 777, 60, what="777 rows counted")
    time.sleep(2)
    assert inserted() - value(before, "milvus_cdc_replicated_rows_total", task_id=task_id, collection=qualified,
                              op="insert") == 777, "counted exactly once"
    samples = scrape(server)
    assert value(samples, "milvus_cdc_replicated_rows_total", task_id=task_id, op="delete") == 3
    assert value(samples, "milvus_cdc_replicated_bytes_total", task_id=task_id, op="insert") > 777 * 16
    assert value(samples, "milvus_cdc_messages_read_total", task_id=task_id) > 0
    assert value(samples, "milvus_cdc_ddl_operations_total", task_id=task_id, operation="CreateCollection") == 1
    assert value(samples, "milvus_cdc_target_call_seconds_count", operation="ReplicateMessage") > 0
    assert value(samples, "milvus_cdc_meta_store_writes_total", kind="checkpoint", outcome="ok") > 0
    assert value(samples, "milvus_cdc_api_requests_total", request_type="create", code="200") >= 1
    assert value(samples, "milvus_cdc_task_state", task_id=task_id, state="Running") == 1
    assert ("milvus_cdc_read_queue_batches", (("task_id", task_id),)) in samples
    # Where the time goes (issue 20): every stage moved. (Their means are not ordered: each stage is observed
    # when it moves, and they move at different moments.)
    for stage in ("tick_read", "catalog_promised", "operations_promised", "ordered", "sent", "acknowledged",
                  "checkpointed", "ticked"):
        assert value(samples, "milvus_cdc_stage_lag_seconds_count", stage=stage) > 0, f"stage {stage} never moved"
        assert value(samples, "milvus_cdc_stage_lag_seconds_sum", stage=stage) > 0
    # Lag per channel: the figure get shows.
    shown = {c["channel"]: c["lag_seconds"] for c in server.task(task_id)["channels"]}
    gauges = {dict(ls)["channel"]: v for (n, ls), v in scrape(server).items()
              if n == "milvus_cdc_channel_lag_seconds" and dict(ls)["task_id"] == task_id}
    assert set(gauges) == {c for c, lag in shown.items() if lag is not None}
    assert all(abs(gauges[c] - shown[c]) < 1.5 for c in gauges), (gauges, shown)

    # The last verify run, as the dashboard draws it.
    server.call("verify", task_id=task_id)
    wait_until(lambda: server.task(task_id)["verify"]["state"] != "running", 120, what="verify to end")
    samples = scrape(server)
    assert value(samples, "milvus_cdc_verify_result", task_id=task_id, result="equal") == 1, \
        server.task(task_id)["verify"]
    assert value(samples, "milvus_cdc_verify_differing_rows", task_id=task_id) == 0
    assert value(samples, "milvus_cdc_verify_rows_compared", task_id=task_id) == 774

    # A target outage shows in the retry counter and in the waiting gauge.
    retried = value(scrape(server), "milvus_cdc_target_retries_total", task_id=task_id)
    relay.cut()
    source.insert(name, [{"id": 5000, "s": "x", "v": [0.1] * 4}])
    wait_until(lambda: value(scrape(server), "milvus_cdc_target_retries_total", task_id=task_id) > retried, 30,
               what="retries counted")
    assert value(scrape(server), "milvus_cdc_task_waiting", task_id=task_id) == 1
    relay.restore()
    wait_until(lambda: value(scrape(server), "milvus_cdc_task_waiting", task_id=task_id) == 0, 30,
               what="the wait over")

    # Every metric the dashboard plots is one the server exports.
    import re
    from pathlib import Path
    exported = {n for n, _ in scrape(server)}
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "grafana-dashboard.json").read_text())
    wanted = {name for panel in dashboard["panels"] for target in panel["targets"]
              for name in re.findall(r"milvus_cdc_[a-z_]+", target["expr"])}
    assert wanted and wanted <= exported, sorted(wanted - exported)

    # A paused task shows in the state gauge.
    server.call("pause", task_id=task_id)
    samples = scrape(server)
    assert value(samples, "milvus_cdc_task_state", task_id=task_id, state="Paused") == 1
    assert value(samples, "milvus_cdc_task_state", task_id=task_id, state="Running") == 0
    assert value(samples, "milvus_cdc_tasks", state="Paused") == 1
    server.call("delete", task_id=task_id)
    assert value(scrape(server), "milvus_cdc_replicated_rows_total", task_id=task_id) == 0, "a deleted task's go"
    source.release_collection(name)
    source.drop_collection(name)
    relay.cut()


def test_health_and_readiness(stack, tmp_path, unique_name):
    etcd = PrivateEtcd(tmp_path).start()
    config = server_config(stack, tmp_path, store="etcd")
    config["metaStoreConfig"]["etcd"] = {"address": [f"http://{etcd.address}"]}
    server = CdcServer(config, tmp_path).start()
    try:
        assert probe(server, "/healthz") == (200, {"code": 200, "message": "serving", "status": "ok"})
        assert probe(server, "/readyz")[0] == 200
        server.create_task(stack["target_milvus"], collections=[unique_name("ready")])
        assert probe(server, "/readyz")[0] == 200
        etcd.freeze()
        try:
            status, answer = wait_until(lambda: (r := probe(server, "/readyz"))[0] == 503 and r, 30,
                                        what="readyz to say the meta store is down")
            assert answer["status"] == "not ready" and "meta store" in answer["message"], answer
            assert probe(server, "/healthz")[0] == 200, "the process still serves"
        finally:
            etcd.thaw()
        wait_until(lambda: probe(server, "/readyz")[0] == 200, 30, what="ready again")
    finally:
        server.stop()
        etcd.stop()
