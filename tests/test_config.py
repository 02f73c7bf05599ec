"""The configuration: the seed's keys and the Go CDC's load, a wrong value stops start-up with one line naming the
key, an unknown key is a warning (naming the key it likely misspells), Go CDC keys with no use here are named in
one info line, and no secret is repeated in any of these lines."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import milvus_cdc as m

ROOT = Path(__file__).resolve().parent.parent
# The usage document lies beside the project's checkout (../shared/seeds); a clone made elsewhere (CI's) finds it
# where this workplace keeps it.
USAGE_DOCUMENT = next((p for p in (ROOT.parent / "shared" / "seeds" / "000_ca5ccc72ade68582.txt",
                                   Path("/work/shared/seeds/000_ca5ccc72ade68582.txt")) if p.is_file()),
                      ROOT.parent / "shared" / "seeds" / "000_ca5ccc72ade68582.txt")

# The server configuration template of the usage document, with its commented-out parts switched on.
SEED_TEMPLATE = """
address: 0.0.0.0:8444
maxTaskNum: 100
maxNameLength: 256
metaStoreConfig:
  storeType: mysql
  etcd:
    address:
      - http://127.0.0.1:2379
    enableAuth: false
    username: root
    password: root123456
    enableTLS: false
    tlsCertPath: deployment/cert/client.pem
    tlsKeyPath: deployment/cert/client.key
    tlsCACertPath: deployment/cert/ca.pem
  mysqlSourceUrl: root:root@tcp(127.0.0.1:3306)/milvus-cdc?charset=utf8
  rootPath: cdc
sourceConfig:
  etcd:
    address:
      - http://127.0.0.1:2379
    rootPath: by-dev
    metaSubPath: meta
    enableAuth: true
    username: root
    password: root123456
    enableTLS: false
    tlsCertPath: deployment/cert/client.pem
    tlsKeyPath: deployment/cert/client.key
    tlsCACertPath: deployment/cert/ca.pem
    tlsMinVersion: 1.3
  etcdRootPath: by-dev
  etcdMetaSubPath: meta
  defaultPartitionName: _default
  readChanLen: 4
  replicateChan: by-dev-replicate-msg
  pulsar:
    address: pulsar://localhost:6650
    webAddress: localhost:80
    maxMessageSize: 5242880
    tenant: public
    namespace: default
    authPlugin: org.apache.pulsar.client.impl.auth.AuthenticationToken
    authParams: token:xxx
"""


def usage_document_template() -> str:
    """The "CDC Startup Config" YAML block of the usage document, as written there (comments and all)."""
    if not USAGE_DOCUMENT.is_file():
        what = f"the usage document {USAGE_DOCUMENT} is missing"
        if os.environ.get("CI"):
            pytest.fail(what)
        pytest.skip(what)
    text = USAGE_DOCUMENT.read_text()
    start, end = text.index("# cdc server address"), text.index("After completing these two steps")
    return text[start:end]


# The Go CDC's server/configs/cdc.yaml, v1.0.0 and head: the same keys and values, written here as data; the
# addresses are parameters so the real-stack tests (test_go_config.py) change only them.
def go_v1_template(address="0.0.0.0:8444", etcd="localhost:2379", pulsar="pulsar://localhost:6650",
                   mysql_url="root:root@tcp(127.0.0.1:3306)/milvuscdc?charset=utf8", root_path="cdc") -> dict:
    return {
        "address": address, "maxTaskNum": 100, "maxNameLength": 256,
        "metaStoreConfig": {"storeType": "etcd", "etcdEndpoints": [etcd], "mysqlSourceUrl": mysql_url,
                            "rootPath": root_path},
        "sourceConfig": {"etcdAddress": [etcd], "etcdRootPath": "by-dev", "etcdMetaSubPath": "meta",
                         "readChanLen": 10, "defaultPartitionName": "_default",
                         "pulsar": {"address": pulsar, "webAddress": "localhost:80", "maxMessageSize": 5242880,
                                    "tenant": "public", "namespace": "default"}},
    }


def go_head_template(address="0.0.0.0:8444", etcd="http://127.0.0.1:2379", pulsar="pulsar://localhost:6650",
                     mysql_url="root:root@tcp(127.0.0.1:3306)/milvuscdc?charset=utf8",
                     root_path="cdc-by-dev") -> dict:
    def etcd_settings(**more) -> dict:
        return {"address": [etcd], **more, "enableAuth": False, "username": "root", "password": "root123456",
                "enableTLS": False, "tlsCertPath": "deployment/cert/client.pem",
                "tlsKeyPath": "deployment/cert/client.key", "tlsCACertPath": "deployment/cert/ca.pem",
                "tlsMinVersion": 1.3}
    return {
        "address": address, "maxTaskNum": 100, "maxNameLength": 256, "logLevel": "info",
        "detectDeadLock": False, "batchMode": True,
        "metaStoreConfig": {"storeType": "etcd", "etcd": etcd_settings(), "mysqlSourceUrl": mysql_url,
                            "rootPath": root_path},
        "sourceConfig": {"etcd": etcd_settings(rootPath="by-dev", metaSubPath="meta"), "readChanLen": 4,
                         "defaultPartitionName": "_default", "replicateChan": "by-dev-replicate-msg",
                         "pulsar": {"address": pulsar, "webAddress": "localhost:80", "maxMessageSize": 5242880,
                                    "tenant": "public", "namespace": "default"}},
    }


def warnings_of(messages) -> list[str]:
    return [text for level, text in messages if level == logging.WARNING]


def infos_of(messages) -> list[str]:
    return [text for level, text in messages if level == logging.INFO]


def write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def base() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_the_repository_config_loads_without_warnings():
    config, messages = m.load_config(str(ROOT / "config.yaml"))
    assert messages == []
    assert (config.host, config.port, config.meta_store.store_type) == ("0.0.0.0", 8444, m.StoreType.SQLITE)
    assert config.source.mq_type is m.MqType.KAFKA and config.source.read_chan_len == 4


def test_every_key_of_the_usage_document_loads_and_the_web_address_is_a_note(tmp_path):
    config, messages = m.load_config(write(tmp_path, SEED_TEMPLATE))
    assert messages == [(logging.INFO, "config: sourceConfig.pulsar.webAddress not needed here: this CDC reads "
                                       "through the broker's pulsar:// address")]
    assert config.meta_store.store_type is m.StoreType.MYSQL
    assert config.meta_store.mysql == {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "root",
                                       "database": "milvus-cdc", "charset": "utf8"}
    assert config.source.mq_type is m.MqType.PULSAR and config.source.pulsar["authParams"] == "token:xxx"
    assert (config.source.root_path, config.source.meta_sub_path) == ("by-dev", "meta")
    assert config.source.etcd.username == "root" and config.source.etcd.password == "root123456"
    assert config.source.replicate_chan == "by-dev-replicate-msg"
    assert config.source.etcd.tls_min_version == "1.3" and config.source.pulsar["maxMessageSize"] == 5242880
    assert config.source.default_partition_name == "_default"


def test_max_message_size_bounds_the_pulsar_prefetch():
    reader = m.PulsarChannelReader.__new__(m.PulsarChannelReader)
    assert max(10, min(1000, reader.PREFETCH_BYTES // 5242880)) == 51
    assert max(10, min(1000, reader.PREFETCH_BYTES // (1 << 30))) == 10


def tls_server(max_version) -> int:
    """A TLS server (Python's ssl) offering at most ``max_version``: stands in for an etcd endpoint."""
    import socket
    import ssl
    import threading
    from tls_certs import make_certs
    import tempfile
    certs = make_certs(Path(tempfile.mkdtemp()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server_pem"], certs["server_key"])
    context.maximum_version = max_version
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve():
        while True:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass
    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def test_tls_min_version_refuses_an_endpoint_that_offers_less():
    import ssl
    port = tls_server(ssl.TLSVersion.TLSv1_2)
    settings = m.EtcdSettings((f"https://127.0.0.1:{port}",), tls=True, tls_min_version="1.3")
    assert "does not offer TLS 1.3" in settings.check_tls_floor()
    assert m.EtcdSettings((f"https://127.0.0.1:{port}",), tls=True, tls_min_version="1.2").check_tls_floor() is None
    assert m.EtcdSettings((f"https://127.0.0.1:{port}",), tls=False, tls_min_version="1.3").check_tls_floor() is None


def test_an_unknown_key_is_a_warning_naming_it(tmp_path):
    data = base()
    data["sourceConfig"]["foo"] = 1
    data["bar"] = {"baz": 2}
    _, messages = m.load_config(write(tmp_path, data))
    assert sorted(messages) == [(logging.WARNING, "config: unknown key bar ignored"),
                                (logging.WARNING, "config: unknown key sourceConfig.foo ignored")]


def set_key(data: dict, dotted: str, value):
    node = data
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value


DELETE = object()


@pytest.mark.parametrize("changes, named", [
    ({"maxTaskNum": 0}, "maxTaskNum"),
    ({"maxTaskNum": "x"}, "maxTaskNum"),
    ({"maxNameLength": -1}, "maxNameLength"),
    ({"address": "nope:xx"}, "address"),
    ({"logLevel": "loud"}, "logLevel"),
    ({"metaStoreConfig.storeType": "redis"}, "metaStoreConfig.storeType"),
    ({"metaStoreConfig.storeType": "mysql"}, "metaStoreConfig.mysqlSourceUrl"),
    ({"metaStoreConfig.storeType": "mysql", "metaStoreConfig.mysqlSourceUrl": "root@somewhere"},
     "metaStoreConfig.mysqlSourceUrl"),
    ({"sourceConfig.readChanLen": 0}, "sourceConfig.readChanLen"),
    ({"sourceConfig.pulsar": {"address": "pulsar://h:6650"}}, "sourceConfig"),
    ({"sourceConfig.kafka": DELETE}, "sourceConfig"),
    ({"sourceConfig.kafka": DELETE, "sourceConfig.pulsar": {"address": "h:6650"}}, "sourceConfig.pulsar.address"),
    ({"sourceConfig.etcd.rootPath": "a", "sourceConfig.etcdRootPath": "b"}, "sourceConfig.etcd.rootPath"),
    ({"sourceConfig.etcd.enableTLS": True, "sourceConfig.etcd.tlsCertPath": "/no/such.pem"},
     "sourceConfig.etcd.tlsCertPath"),
    ({"sourceConfig.etcd.address": []}, "sourceConfig.etcd.address"),
    ({"sourceConfig.etcd.enableAuth": "sometimes"}, "sourceConfig.etcd.enableAuth"),
    ({"replication.checkpointInterval": 0}, "replication.checkpointInterval"),
    ({"replication.retryTimeout": -5}, "replication.retryTimeout"),
    ({"replication.callsPerChannel": 0}, "replication.callsPerChannel"),
    ({"apiToken": "short"}, "apiToken"),
    ({"sourceConfig.etcd.tlsMinVersion": "1.4"}, "sourceConfig.etcd.tlsMinVersion"),
    ({"sourceConfig.kafka.consumer": {"fetch.max.bytes": "lots"}}, "sourceConfig.kafka.consumer.fetch.max.bytes"),
    ({"sourceConfig.kafka.consumer": {"security.protocol": "carrier-pigeon"}},
     "sourceConfig.kafka.consumer.security.protocol"),
    ({"sourceConfig.kafka.consumer": {"ssl.ca.location": "/no/such/ca.pem"}},
     "sourceConfig.kafka.consumer.ssl.ca.location"),
    ({"sourceConfig.kafka.consumer": ["client.id"]}, "sourceConfig.kafka.consumer"),
    ({"sourceConfig.kafka.producer": {"nested": {"a": 1}}}, "sourceConfig.kafka.producer"),
    ({"sourceConfig.kafka.saslMechanisms": "MAGIC"}, "sourceConfig.kafka.saslMechanisms"),
    ({"sourceConfig.kafka.securityProtocol": "TLS"}, "sourceConfig.kafka.securityProtocol"),
    ({"sourceConfig.kafka.saslUsername": "cdc"}, "sourceConfig.kafka.saslPassword"),
    ({"metaStoreConfig.storeType": "etcd", "metaStoreConfig.etcdEndpoints": ["not a:port"]},
     "metaStoreConfig.etcdEndpoints"),
    ({"sourceConfig.etcdAddress": "h:notaport"}, "sourceConfig.etcdAddress"),
    ({"dryRun": True}, "dryRun"),
])
def test_a_wrong_value_is_refused_naming_the_key(tmp_path, changes, named):
    data = base()
    for dotted, value in changes.items():
        set_key(data, dotted, value)
    with pytest.raises(m.ConfigError) as refused:
        m.load_config(write(tmp_path, data))
    message = str(refused.value)
    assert named in message and "\n" not in message, message


@pytest.mark.parametrize("store_type", ["redis", "ETCD", "MySQL", ""])
def test_an_unknown_store_type_is_refused_naming_the_allowed_ones(tmp_path, store_type):
    """Issue 18, item 4: the store type chose etcd for any word open_meta_store did not know. The config refuses
    it first, naming what it takes; the words match exactly, as in the Go CDC (a switch on "mysql", "etcd")."""
    data = base()
    data["metaStoreConfig"]["storeType"] = store_type
    with pytest.raises(m.ConfigError) as refused:
        m.load_config(write(tmp_path, data))
    assert str(refused.value) == (f"config: metaStoreConfig.storeType must be one of sqlite, mysql, etcd, "
                                  f"got {store_type!r}")


@pytest.mark.parametrize("store_type", list(m.StoreType))
def test_every_store_type_is_read_as_its_enum(tmp_path, store_type):
    data = base()
    data["metaStoreConfig"].update(storeType=store_type.value, mysqlSourceUrl="cdc:pw@tcp(db:3306)/cdc")
    config, _ = m.load_config(write(tmp_path, data))
    assert config.meta_store.store_type is store_type


def test_a_cluster_on_a_store_without_leases_is_refused_naming_those_with_them(tmp_path):
    data = base()
    data["metaStoreConfig"]["storeType"] = "sqlite"
    data["cluster"] = {"enabled": True}
    with pytest.raises(m.ConfigError) as refused:
        m.load_config(write(tmp_path, data))
    assert str(refused.value) == ("config: cluster.enabled needs metaStoreConfig.storeType mysql or etcd (the "
                                  "servers share its tasks); sqlite is for one server")


def test_files_that_cannot_be_read(tmp_path):
    with pytest.raises(m.ConfigError, match="cannot read"):
        m.load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(m.ConfigError, match="not valid YAML"):
        m.load_config(write(tmp_path, "address: [unclosed"))
    with pytest.raises(m.ConfigError, match="must be a mapping"):
        m.load_config(write(tmp_path, "- a list\n"))


def test_the_server_stops_with_one_line_on_a_bad_config(tmp_path):
    data = base()
    data["sourceConfig"]["readChanLen"] = "many"
    result = subprocess.run([sys.executable, str(ROOT / "milvus_cdc.py"), "-c", write(tmp_path, data)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "sourceConfig.readChanLen" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("dsn, expected", [
    ("root:root@tcp(127.0.0.1:3306)/milvus-cdc?charset=utf8",
     {"host": "127.0.0.1", "port": 3306, "user": "root", "password": "root", "database": "milvus-cdc",
      "charset": "utf8"}),
    ("u:p@ss:w@rd@tcp(db.example:3307)/cdc",
     {"host": "db.example", "port": 3307, "user": "u", "password": "p@ss:w@rd", "database": "cdc",
      "charset": "utf8mb4"}),
    ("root@tcp(h)/x", {"host": "h", "port": 3306, "user": "root", "password": "", "database": "x",
                       "charset": "utf8mb4"}),
    ("mysql://a:b%40c@h:3310/d?charset=latin1",
     {"host": "h", "port": 3310, "user": "a", "password": "b@c", "database": "d", "charset": "latin1"}),
])
def test_go_and_url_dsn_forms(dsn, expected):
    assert m.parse_mysql_dsn(dsn) == expected


@pytest.mark.parametrize("dsn", ["", "root:root@tcp(h:1)", "root@unix(/tmp/s)/db", "just text"])
def test_malformed_dsns(dsn):
    with pytest.raises(ValueError):
        m.parse_mysql_dsn(dsn)


def test_host_port_forms():
    assert m.split_host_port("http://127.0.0.1:2379", 1) == ("127.0.0.1", 2379)
    assert m.split_host_port("localhost", 2379) == ("localhost", 2379)
    assert m.split_host_port("[::1]:9092", 1) == ("::1", 9092)


# ---------------------------------------------------------------------------------------------------------
# A Go CDC user's config, as written
# ---------------------------------------------------------------------------------------------------------

def test_the_usage_documents_template_as_written_loads(tmp_path):
    config, messages = m.load_config(write(tmp_path, usage_document_template()))
    assert warnings_of(messages) == []
    assert [text for text in infos_of(messages) if "webAddress" in text]
    assert config.meta_store.store_type is m.StoreType.MYSQL and config.source.mq_type is m.MqType.PULSAR
    assert config.source.etcd.endpoints == ("http://127.0.0.1:2379",)


@pytest.mark.parametrize("template", [go_v1_template, go_head_template])
def test_the_go_cdc_templates_load(tmp_path, template):
    config, messages = m.load_config(write(tmp_path, template()))
    assert warnings_of(messages) == []
    assert config.meta_store.store_type is m.StoreType.ETCD and config.source.mq_type is m.MqType.PULSAR
    assert (config.source.root_path, config.source.meta_sub_path) == ("by-dev", "meta")
    assert config.source.pulsar["address"] == "pulsar://localhost:6650"
    notes = infos_of(messages)
    assert "config: sourceConfig.pulsar.webAddress not needed here: this CDC reads through the broker's pulsar:// " \
           "address" in notes
    if template is go_head_template:
        assert "config: Go CDC keys not needed here, accepted and ignored: detectDeadLock, batchMode" in notes
        assert config.source.etcd.endpoints == config.meta_store.etcd.endpoints == ("http://127.0.0.1:2379",)
    else:
        assert len(notes) == 1
        assert config.source.etcd.endpoints == config.meta_store.etcd.endpoints == ("localhost:2379",)


@pytest.mark.parametrize("endpoint", ["10.1.2.3:2381", "http://10.1.2.3:2381"])
def test_the_v1_spellings_name_the_etcd_endpoints(tmp_path, endpoint):
    data = go_v1_template(etcd="unused:1")
    data["metaStoreConfig"]["etcdEndpoints"] = [endpoint, "10.1.2.4:2381"]
    data["sourceConfig"]["etcdAddress"] = [endpoint]
    config, messages = m.load_config(write(tmp_path, data))
    assert config.meta_store.etcd.endpoints == (endpoint, "10.1.2.4:2381")
    assert config.source.etcd.endpoints == (endpoint,)
    assert [m.split_host_port(e, 2379) for e in config.source.etcd.endpoints] == [("10.1.2.3", 2381)]
    assert warnings_of(messages) == []


@pytest.mark.parametrize("old_key, new_key", [
    ("metaStoreConfig.etcdEndpoints", "metaStoreConfig.etcd.address"),
    ("sourceConfig.etcdAddress", "sourceConfig.etcd.address"),
])
def test_old_and_new_spellings_that_disagree_are_refused_naming_both(tmp_path, old_key, new_key):
    data = go_v1_template(etcd="10.1.2.3:2379")
    set_key(data, new_key, ["http://10.9.9.9:2379"])
    with pytest.raises(m.ConfigError) as refused:
        m.load_config(write(tmp_path, data))
    message = str(refused.value)
    assert old_key in message and new_key in message and "disagree" in message, message
    set_key(data, new_key, ["http://10.1.2.3:2379"])  # the same endpoint, with a scheme: they agree
    config, _ = m.load_config(write(tmp_path, data))
    assert (config.meta_store.etcd if old_key.startswith("meta") else config.source.etcd).endpoints == \
        ("10.1.2.3:2379",)


def kafka_config(tmp_path, **kafka) -> tuple[m.ServerConfig, list]:
    data = base()
    data["sourceConfig"]["kafka"] = {"address": "127.0.0.1:9092", **kafka}
    return m.load_config(write(tmp_path, data))


def test_the_go_cdcs_flat_sasl_keys_reach_the_consumer(tmp_path):
    config, messages = kafka_config(tmp_path, saslUsername="cdc", saslPassword="s3cret-pass",
                                    saslMechanisms="SCRAM-SHA-512", securityProtocol="SASL_SSL")
    assert warnings_of(messages) == []
    options = m.KafkaChannelReader.consumer_options(config.source.kafka)
    assert {k: options[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                    "sasl_plain_password", "bootstrap_servers", "group_id")} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "cdc",
        "sasl_plain_password": "s3cret-pass", "bootstrap_servers": ["127.0.0.1:9092"], "group_id": None}


def test_sasl_defaults_the_nested_form_and_no_sasl(tmp_path):
    config, _ = kafka_config(tmp_path, saslUsername="cdc", saslPassword="pw")
    options = m.KafkaChannelReader.consumer_options(config.source.kafka)
    assert (options["security_protocol"], options["sasl_mechanism"]) == ("SASL_PLAINTEXT", "PLAIN")
    config, messages = kafka_config(tmp_path, sasl={"username": "old", "password": "pw2", "mechanisms": "PLAIN",
                                                    "securityProtocol": "SASL_PLAINTEXT"})
    assert warnings_of(messages) == []
    options = m.KafkaChannelReader.consumer_options(config.source.kafka)
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("old", "pw2")
    config, _ = kafka_config(tmp_path, securityProtocol="ssl")  # TLS without SASL, in librdkafka's lower case
    options = m.KafkaChannelReader.consumer_options(config.source.kafka)
    assert options["security_protocol"] == "SSL" and "sasl_plain_username" not in options
    options = m.KafkaChannelReader.consumer_options(kafka_config(tmp_path)[0].source.kafka)
    assert "security_protocol" not in options and "sasl_mechanism" not in options


def test_flat_and_nested_sasl_that_disagree_are_refused_without_the_passwords(tmp_path):
    with pytest.raises(m.ConfigError) as refused:
        kafka_config(tmp_path, saslUsername="cdc", saslPassword="first-secret",
                     sasl={"username": "cdc", "password": "second-secret"})
    message = str(refused.value)
    assert "sourceConfig.kafka.saslPassword" in message and "sourceConfig.kafka.sasl.password" in message
    assert "first-secret" not in message and "second-secret" not in message
    config, _ = kafka_config(tmp_path, saslUsername="cdc", saslPassword="same", sasl={"username": "cdc"})
    assert config.source.kafka["sasl"]["username"] == "cdc"


def test_the_consumer_map_becomes_kafka_python_options_and_the_rest_is_named_once(tmp_path):
    from kafka import KafkaConsumer
    ca, cert, key = (tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key")
    for path in (ca, cert, key):
        path.write_text("-")
    config, messages = kafka_config(
        tmp_path,
        consumer={"client.id": "cdc-1", "fetch.max.bytes": "1048576", "max.partition.fetch.bytes": 524288,
                  "security.protocol": "ssl", "ssl.ca.location": str(ca), "ssl.certificate.location": str(cert),
                  "ssl.key.location": str(key), "ssl.key.password": "key-secret",
                  "ssl.endpoint.identification.algorithm": "none", "check.crcs": "false",
                  "group.id": "theirs", "enable.auto.commit": "true", "session.timeout.ms": 6000},
        producer={"client.id": "cdc-1", "linger.ms": 5, "sasl.password": "producer-secret"})
    options = m.KafkaChannelReader.consumer_options(config.source.kafka)
    assert {k: options[k] for k in ("client_id", "fetch_max_bytes", "max_partition_fetch_bytes", "security_protocol",
                                    "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password",
                                    "ssl_check_hostname", "check_crcs", "group_id", "enable_auto_commit")} == {
        "client_id": "cdc-1", "fetch_max_bytes": 1048576, "max_partition_fetch_bytes": 524288,
        "security_protocol": "SSL", "ssl_cafile": str(ca), "ssl_certfile": str(cert), "ssl_keyfile": str(key),
        "ssl_password": "key-secret", "ssl_check_hostname": False, "check_crcs": False, "group_id": None,
        "enable_auto_commit": False}
    assert set(options) <= set(KafkaConsumer.DEFAULT_CONFIG)  # kafka-python would refuse any other argument
    assert warnings_of(messages) == []
    notes = infos_of(messages)
    assert len(notes) == 1, notes
    note = notes[0]
    for named in ("sourceConfig.kafka.producer.client.id", "sourceConfig.kafka.producer.linger.ms",
                  "sourceConfig.kafka.producer.sasl.password", "sourceConfig.kafka.consumer.group.id",
                  "sourceConfig.kafka.consumer.enable.auto.commit", "sourceConfig.kafka.consumer.session.timeout.ms"):
        assert named in note, note
    assert "consumer.client.id" not in note and "consumer.fetch.max.bytes" not in note
    assert "key-secret" not in note and "producer-secret" not in note


def test_the_consumer_map_wins_over_the_flat_keys_as_in_the_go_cdc(tmp_path):
    config, _ = kafka_config(tmp_path, saslUsername="cdc", saslPassword="pw", securityProtocol="SASL_PLAINTEXT",
                             consumer={"security.protocol": "SASL_SSL", "sasl.mechanisms": "scram-sha-256"})
    options = m.KafkaChannelReader.consumer_options(config.source.kafka)
    assert (options["security_protocol"], options["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-256")


GO_ONLY = {"detectDeadLock": True, "batchMode": True, "replicateID": "cdc-a", "dryRun": False,
           "Packer": {"TimerInterval": 5000, "MaxCount": 10}, "Retry": {"RetryTimes": 5, "MaxBackOff": 10},
           "enableReverse": False, "reverseMilvus": {"host": "localhost", "port": 19530},
           "currentMilvus": {"host": "localhost", "port": 19530}, "sourceConfig.channelNum": 16,
           "sourceConfig.timeTickInterval": 200}


def test_the_go_cdcs_own_keys_are_accepted_and_named_in_one_info_line(tmp_path):
    data = base()
    for dotted, value in GO_ONLY.items():
        set_key(data, dotted, value)
    _, messages = m.load_config(write(tmp_path, data))
    assert warnings_of(messages) == []
    notes = [text for text in infos_of(messages) if "Go CDC keys" in text]
    assert notes == ["config: Go CDC keys not needed here, accepted and ignored: detectDeadLock, batchMode, "
                     "replicateID, Packer, Retry, enableReverse, reverseMilvus, currentMilvus, dryRun, "
                     "sourceConfig.channelNum, sourceConfig.timeTickInterval"]
    assert len(infos_of(messages)) == 1


def test_go_cdc_keys_that_ask_for_what_is_not_here(tmp_path):
    data = base()
    data["enableReverse"] = True
    _, messages = m.load_config(write(tmp_path, data))
    assert [text for text in warnings_of(messages) if "enableReverse" in text]
    data = {**base(), "dryRun": "true"}
    with pytest.raises(m.ConfigError, match="dryRun is true, but this CDC has no dry run"):
        m.load_config(write(tmp_path, data))


def test_keys_match_regardless_of_case_like_the_go_cdc(tmp_path):
    data = base()
    data.pop("maxTaskNum")
    data["MaxTaskNum"] = 7
    data["sourceConfig"].pop("readChanLen")
    data["sourceConfig"]["ReadChanLen"] = 9
    data["metaStoreConfig"].pop("rootPath")
    data["metaStoreConfig"]["rootpath"] = "mine"
    config, messages = m.load_config(write(tmp_path, data))
    assert (config.max_task_num, config.source.read_chan_len, config.meta_store.root_path) == (7, 9, "mine")
    assert warnings_of(messages) == []
    data["maxTaskNum"] = 8  # two spellings of one key: which one is meant is not for the server to guess
    with pytest.raises(m.ConfigError) as refused:
        m.load_config(write(tmp_path, data))
    assert "maxTaskNum" in str(refused.value) and "MaxTaskNum" in str(refused.value)


@pytest.mark.parametrize("dotted, nearest", [
    ("sourceConfig.readChanLem", "sourceConfig.readChanLen"),
    ("maxTaskNumber", "maxTaskNum"),
    ("metaStoreConfig.etcdEndpoint", "metaStoreConfig.etcdEndpoints"),
    ("sourceConfig.kafka.saslUserName2", "sourceConfig.kafka.saslUsername"),
    ("sourceConfig.defaultPartitonName", "sourceConfig.defaultPartitionName"),
])
def test_a_likely_typo_is_a_warning_naming_the_nearest_key(tmp_path, dotted, nearest):
    data = base()
    set_key(data, dotted, 1)
    _, messages = m.load_config(write(tmp_path, data))
    assert warnings_of(messages) == [f"config: unknown key {dotted} ignored; did you mean {nearest}?"]


def test_no_secret_appears_in_any_line_about_the_config(tmp_path):
    secrets = ["etcd-secret-1", "kafka-secret-2", "token-secret-3-abcdefgh", "pulsar-secret-4", "mysql-secret-5",
               "consumer-secret-6", "producer-secret-7", "key-secret-8"]
    data = go_head_template()
    data["metaStoreConfig"].update(storeType="mysql", mysqlSourceUrl=f"cdc:{secrets[4]}@tcp(db:3306)/cdc")
    data["sourceConfig"]["etcd"].update(enableAuth=True, password=secrets[0])
    data["apiToken"] = secrets[2]
    data["sourceConfig"]["pulsar"]["authParams"] = f"token:{secrets[3]}"
    data.update({k: v for k, v in GO_ONLY.items() if "." not in k}, unknownThing=1, reverseMilvus={
        "host": "h", "password": "also-secret-9"})
    _, messages = m.load_config(write(tmp_path, data))
    kafka = {"address": "127.0.0.1:9092", "saslUsername": "cdc", "saslPassword": secrets[1],
             "consumer": {"sasl.password": secrets[5], "ssl.key.password": secrets[7], "group.id": "g"},
             "producer": {"sasl.password": secrets[6]}, "sasl": {"passwrd": "x"}}
    data["sourceConfig"].pop("pulsar")
    data["sourceConfig"]["kafka"] = kafka
    _, more = m.load_config(write(tmp_path, data))
    lines = [text for _, text in messages + more]
    assert any("unknown key" in line for line in lines) and any("not used here" in line for line in lines)
    for line in lines:
        for secret in secrets + ["also-secret-9"]:
            assert secret not in line, line
    refusals = []
    for change in ({"apiToken": "short-xyzzy"}, {"sourceConfig.kafka.saslPassword": ["list-xyzzy"]},
                   {"sourceConfig.kafka.consumer": {"sasl.password": "a", "ssl.key.password": ["list-xyzzy"]}}):
        bad = yaml.safe_load(yaml.safe_dump(data))
        for dotted, value in change.items():
            set_key(bad, dotted, value)
        with pytest.raises(m.ConfigError) as refused:
            m.load_config(write(tmp_path, bad))
        refusals.append(str(refused.value))
    assert not [r for r in refusals if "xyzzy" in r], refusals


def test_the_server_logs_the_config_lines_at_their_levels(tmp_path):
    """main() logs each line once, at its level, before it opens anything; the bad etcd endpoint stops it after."""
    data = go_head_template(etcd="http://127.0.0.1:9")
    data["sourceConfig"]["readChanLem"] = 3
    result = subprocess.run([sys.executable, str(ROOT / "milvus_cdc.py"), "-c", write(tmp_path, data)],
                            capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert re.search(r"INFO milvus_cdc: config: sourceConfig\.pulsar\.webAddress not needed here", out), out
    assert re.search(r"INFO milvus_cdc: config: Go CDC keys not needed here, accepted and ignored: detectDeadLock, "
                     r"batchMode", out), out
    assert re.search(r"WARNING milvus_cdc: config: unknown key sourceConfig\.readChanLem ignored; did you mean "
                     r"sourceConfig\.readChanLen\?", out), out
    assert "root123456" not in out
