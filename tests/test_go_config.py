"""A Go CDC user's config, as written, starts this server: the usage document's "CDC Startup Config" template and
the Go CDC's v1.0.0 and head server configs, with only their addresses changed to the test stack's, start the
server against the real stack and it serves `list`; the log names the keys with no use here, warns of no key the
templates show, and repeats no secret. Also a Kafka source with the Go CDC's flat SASL keys and its librdkafka
consumer and producer maps, and the consumer map's options used against the stack's real broker.

No task is created, so a Pulsar-sourced config is fine against the stack's pulsar-lite."""
from __future__ import annotations

import re
import uuid
from pathlib import Path

import yaml

import milvus_cdc as m
from helpers import CdcServer
from stack import free_ports
from test_config import go_head_template, go_v1_template, usage_document_template

WEB_ADDRESS_NOTE = "config: sourceConfig.pulsar.webAddress not needed here: this CDC reads through the broker's " \
                   "pulsar:// address"


def mysql_url(stack: dict) -> str:
    my = stack["mysql"]
    return f"{my['user']}:{my['password']}@tcp({my['host']}:{my['port']})/{my['database']}?charset=utf8"


def unique_root_path() -> str:
    return f"cdc-go-config-{uuid.uuid4().hex[:12]}"  # stores on shared servers outlive a test session


def swap(text: str, pattern: str, replacement: str) -> str:
    """Replace the one line of ``text`` that ``pattern`` matches whole; a template that changed fails here."""
    text, count = re.subn(f"^{pattern}$", replacement, text, flags=re.M)
    assert count == 1, f"{pattern!r} matched {count} lines of the template"
    return text


def serve(tmp_path: Path, config: dict, text: str | None = None) -> str:
    """Start the server on ``config`` (or on ``text``, the file as written, when given), check `list` answers
    200 with no task, stop it; returns its log."""
    server = CdcServer(config, tmp_path)
    if text is not None:
        server.config_path.write_text(text)
    try:
        server.start()
        status, answer = server.post({"request_type": "list"})
        assert status == 200 and answer["code"] == 200 and answer["data"]["tasks"] == [], (status, answer)
    finally:
        server.stop()
    log = server.log_text()
    assert "unknown key" not in log, log
    assert "root123456" not in log, log  # the templates' etcd password
    return log


def test_the_usage_documents_template_starts_the_server(stack, tmp_path):
    text = usage_document_template()
    text = swap(text, r"address: 0\.0\.0\.0:8444", f"address: 127.0.0.1:{free_ports(1)[0]}")
    text = swap(text, r"(\s+mysqlSourceUrl:) .*", rf"\1 {mysql_url(stack)}")
    text = swap(text, r"(\s+rootPath:) cdc", rf"\1 {unique_root_path()}")
    text = swap(text, r"(\s+- )http://127\.0\.0\.1:2379", rf"\1http://{stack['etcd']}")  # sourceConfig.etcd
    text = swap(text, r"(\s+address:) pulsar://localhost:6650", rf"\1 {stack['pulsar']}")
    log = serve(tmp_path, yaml.safe_load(text), text)
    assert WEB_ADDRESS_NOTE in log, log


def test_the_go_cdc_v1_template_starts_the_server(stack, tmp_path):
    """The meta store is etcd, found only through v1.0.0's metaStoreConfig.etcdEndpoints (host:port, no scheme):
    were that key not read, the server would try 127.0.0.1:2379 and stop."""
    config = go_v1_template(address=f"127.0.0.1:{free_ports(1)[0]}", etcd=stack["etcd"], pulsar=stack["pulsar"],
                            mysql_url=mysql_url(stack), root_path=unique_root_path())
    log = serve(tmp_path, config)
    assert WEB_ADDRESS_NOTE in log, log
    assert "Go CDC keys" not in log, log


def test_the_go_cdc_head_template_starts_the_server(stack, tmp_path):
    config = go_head_template(address=f"127.0.0.1:{free_ports(1)[0]}", etcd=f"http://{stack['etcd']}",
                              pulsar=stack["pulsar"], mysql_url=mysql_url(stack), root_path=unique_root_path())
    log = serve(tmp_path, config)
    assert WEB_ADDRESS_NOTE in log, log
    assert "config: Go CDC keys not needed here, accepted and ignored: detectDeadLock, batchMode" in log, log


def kafka_source(stack: dict, **kafka) -> dict:
    config = go_head_template(address=f"127.0.0.1:{free_ports(1)[0]}", etcd=f"http://{stack['etcd']}",
                              mysql_url=mysql_url(stack), root_path=unique_root_path())
    config["sourceConfig"].pop("pulsar")
    config["sourceConfig"]["kafka"] = {"address": stack["kafka"], **kafka}
    return config


def test_a_kafka_source_with_the_go_cdcs_flat_sasl_keys_and_librdkafka_maps_starts_the_server(stack, tmp_path):
    config = kafka_source(stack, saslUsername="cdc", saslPassword="kafka-pass-0451", saslMechanisms="PLAIN",
                          securityProtocol="SASL_PLAINTEXT",
                          consumer={"client.id": "cdc-go-config", "fetch.max.bytes": "1048576",
                                    "group.id": "cdc"},
                          producer={"client.id": "cdc-go-config", "linger.ms": "5"})
    log = serve(tmp_path, config)
    assert "kafka-pass-0451" not in log, log
    notes = [line for line in log.splitlines() if "config: not used here:" in line]
    assert len(notes) == 1, log
    assert "sourceConfig.kafka.producer.client.id" in notes[0] and "sourceConfig.kafka.consumer.group.id" in notes[0]
    assert "sourceConfig.kafka.consumer.client.id" not in notes[0]


def test_the_consumer_maps_options_work_against_the_real_broker(stack, tmp_path):
    """The options a Go config's consumer map becomes are ones kafka-python takes, and it reads with them."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(kafka_source(
        stack, consumer={"client.id": "cdc-go-config", "fetch.max.bytes": 1048576, "fetch.wait.max.ms": "20",
                         "reconnect.backoff.max.ms": 2000, "check.crcs": "true"})))
    config, _ = m.load_config(str(path))
    reader = m.KafkaChannelReader(config.source.kafka)
    try:
        assert reader.consumer.config["client_id"] == "cdc-go-config"
        assert (reader.consumer.config["fetch_max_bytes"], reader.consumer.config["fetch_max_wait_ms"]) == \
            (1048576, 20)
        start = reader.add("by-dev-replicate-msg", m.LATEST)
        assert start.kind is m.StartKind.AT and m.KafkaChannelReader.offset(start.msg_id) >= 0
        reader.read(0.5)
        assert reader.at_end("by-dev-replicate-msg")
    finally:
        reader.close()
