#!/usr/bin/env python3
"""Milvus CDC: keeps a target Milvus in step with a source Milvus.

It reads the source's metadata from etcd and its changes from the message queue (Kafka or Pulsar), and writes
them to a target Milvus (``common.ttMsgEnabled: false``) over gRPC: DDL with ``MsgBase.replicateInfo``, data
through ``ReplicateMessage``. Tasks are managed through ``POST /cdc``.

    python milvus_cdc.py -c config.yaml

The module reads top-down in the order data flows, one banner section each:

- Configuration: the YAML file, checked, in this project's and the Go CDC's spellings
- Faults: what is waited out and how (one RetryPolicy for every retry, Patience), and what a task shows meanwhile
- Metrics: the Prometheus registry and each task's counters
- Meta store: tasks and checkpoints (TaskStore) and leases (LeaseStore) in sqlite, MySQL or etcd, chosen from
  one table (META_STORES)
- Source metadata (etcd): the source's catalog, and the poller that follows it
- MQ readers: Kafka and Pulsar channel readers
- Message rewrite: source DML messages addressed to the target's collection, partition and shard
- Target writer: every gRPC call to the target, classified, and the send lanes
- Target mirror: the target's catalog as a task sees it, and the repairs a refusal calls for
- Ordering: one timestamp order over every input (ChangeOrder)
- Replication task: definition and clocks (the task's scope, names and start positions; time ticks)
- Replication task: threads (reader, catalog, applier)
- Replication task: collections and their copies
- Replication task: the applier
- Task requests: what a create may say, checked
- Verification: a task's copy against its source (the verify request)
- Task manager: lifecycle and checked requests
- Cluster: several servers, one set of tasks
- HTTP API: ``POST /cdc``, metrics and health
- Main
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import copy
import dataclasses
import difflib
import enum
import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import random
import re
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from abc import ABC, abstractmethod
import collections
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import yaml


def defer_pymilvus_package() -> None:
    """Load pymilvus's protobuf classes and helpers without the package's ``__init__``, which imports pandas,
    numpy and pyarrow for its ORM (about 70 MiB resident and a third of a second at start): the server needs the
    ORM only to verify a task. The package module stands in empty; its ``__init__`` runs into it on the first
    name asked of it that it lacks (``from pymilvus import MilvusClient``), so every import still works."""
    import importlib.util
    if "pymilvus" in sys.modules:
        return
    spec = importlib.util.find_spec("pymilvus")
    if spec is None or spec.loader is None:
        return  # not installed: the first use says so
    loader = spec.loader
    package = importlib.util.module_from_spec(spec)
    completing = threading.RLock()  # another thread waits for the whole package; its own __init__ does not
    started = False

    def complete(name: str) -> Any:
        nonlocal started
        with completing:
            if not started:
                started = True
                loader.exec_module(package)
                package.__dict__.pop("__getattr__", None)
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'pymilvus' has no attribute {name!r}") from None
    package.__dict__["__getattr__"] = complete  # PEP 562: asked only for the names the module lacks
    sys.modules["pymilvus"] = package


defer_pymilvus_package()

log = logging.getLogger("milvus_cdc")

__version__ = "0.1.0"


###############################################################################
# Configuration ################################################################
###############################################################################

class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the key and what is wrong."""


TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")


def is_secret(key: str) -> bool:
    """Is a key's value a secret, never to be repeated in a message (a password, a token, a DSN with one)?"""
    return any(word in key.lower() for word in ("password", "token", "authparams", "sourceurl"))


# A server that is back (an etcd restarted, a target, a network cut mended) is reconnected within a second or two,
# not after gRPC's default backoff, which reaches two minutes after a few minutes of failures.
GRPC_QUICK_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                        ("grpc.max_reconnect_backoff_ms", 1000))


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...]
    username: str = ""
    password: str = ""
    ca_cert: str = ""
    cert: str = ""
    key: str = ""
    tls: bool = False
    tls_min_version: str = ""  # with tls: every endpoint must offer at least this version (checked at start)

    def client(self, timeout: float = 10.0):
        """A pyetcd client over every endpoint, failing over between them. An endpoint that failed is tried
        again after a second (pyetcd's default is five minutes, which outlasts any etcd restart); a lone endpoint
        at once: pyetcd answers "no endpoint available" without asking while every endpoint counts as failed, and
        one slow answer must not fail every call of the next second."""
        import grpc
        from pyetcd.client import Endpoint, MultiEndpointEtcd3Client
        credentials = None
        if self.tls:
            def read(path: str) -> bytes | None:
                if not path:
                    return None
                with open(path, "rb") as fh:
                    return fh.read()
            credentials = grpc.ssl_channel_credentials(read(self.ca_cert), read(self.key), read(self.cert))
        retry = 1.0 if len(self.endpoints) > 1 else 0.0
        endpoints = [Endpoint(*split_host_port(address, 2379), secure=self.tls, creds=credentials, time_retry=retry,
                              opts=list(GRPC_QUICK_RECONNECT))
                     for address in self.endpoints]
        auth = {"user": self.username, "password": self.password} if self.enable_auth else {}
        return MultiEndpointEtcd3Client(endpoints=endpoints, timeout=timeout, failover=True, **auth)

    @property
    def enable_auth(self) -> bool:
        return bool(self.username)

    def check_tls_floor(self, timeout: float = 5.0) -> str | None:
        """With TLS and tlsMinVersion set: why an endpoint that answers does not offer that version, else None.
        gRPC negotiates the highest version both sides offer, so an endpoint that offers it is used with it."""
        import socket
        import ssl
        if not self.tls or not self.tls_min_version:
            return None
        context = ssl.create_default_context(cafile=self.ca_cert or None)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only the version is in question
        context.minimum_version = getattr(ssl.TLSVersion, "TLSv" + self.tls_min_version.replace(".", "_"))
        for endpoint in self.endpoints:
            host, port = split_host_port(endpoint, 2379)
            try:
                with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw):
                    pass
            except ssl.SSLError as exc:
                return f"etcd at {endpoint} does not offer TLS {self.tls_min_version} or newer ({exc.reason})"
            except OSError:
                continue  # not reachable now: the clients wait for it
        return None


class StoreType(enum.StrEnum):
    """metaStoreConfig.storeType, spelled as in the file. A StrEnum, so messages and the log show the word."""
    SQLITE = "sqlite"
    MYSQL = "mysql"
    ETCD = "etcd"


class MqType(enum.StrEnum):
    """The source Milvus's message queue, chosen by which of sourceConfig.kafka and sourceConfig.pulsar is set."""
    KAFKA = "kafka"
    PULSAR = "pulsar"


@dataclass(frozen=True)
class MetaStoreSettings:
    store_type: StoreType
    root_path: str
    sqlite_path: str = ""
    mysql: dict = field(default_factory=dict)
    etcd: EtcdSettings | None = None


@dataclass(frozen=True)
class SourceSettings:
    etcd: EtcdSettings
    root_path: str
    meta_sub_path: str
    default_partition_name: str
    read_chan_len: int
    replicate_chan: str
    mq_type: MqType
    kafka: dict = field(default_factory=dict)
    pulsar: dict = field(default_factory=dict)
    # the source Milvus's own address: only `verify` reads it (replication reads etcd and the MQ)
    milvus_uri: str = ""
    milvus_token: str = field(default="", repr=False)


@dataclass(frozen=True)
class ReplicationSettings:
    checkpoint_interval: float = 0.2
    retry_timeout: float = 600.0
    retry_max_backoff: float = 10.0
    write_ahead: int = 4  # rounds of messages sent to the target before the oldest must be acknowledged
    calls_per_channel: int = 1  # ReplicateMessage calls with inserts and deletes in flight on one target pchannel


@dataclass(frozen=True)
class ClusterSettings:
    server_id: str
    lease_ttl: float = 10.0


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    max_task_num: int
    max_name_length: int
    log_level: str
    meta_store: MetaStoreSettings
    source: SourceSettings
    replication: ReplicationSettings
    api_token: str = field(default="", repr=False)  # when set, every request needs "Authorization: Bearer <it>"
    cluster: ClusterSettings | None = None           # several servers sharing the meta store's tasks


class ConfigReader:
    """Reads one YAML mapping, checking each value it is asked for and remembering what it read.

    Every problem is reported with the dotted key, so the user knows which line of the file to fix. Keys match
    regardless of case, as in the Go CDC (its YAML goes through encoding/json), so a Go config's ``Retry`` is the
    ``retry`` asked for here; the file's own spelling is the one named in messages.
    """

    MISSING = object()

    def __init__(self, data: Any, path: str = ""):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path or 'the file'} must be a mapping, got {type(data).__name__}")
        self.data, self.path = data, path
        self.read_keys: set[Any] = set()  # keys of data, as the file spells them, that something read
        self.known: set[str] = set()      # every name asked for: what a likely typo is compared with
        self.children: list[ConfigReader] = []

    def key(self, name: Any) -> str:
        return f"{self.path}.{name}" if self.path else str(name)

    def spelling(self, name: str) -> Any:
        """The file's key for ``name`` (any case), or None when the file does not have it."""
        self.known.add(name)
        found = [k for k in self.data if str(k).lower() == name.lower()]
        if len(found) > 1:
            raise ConfigError(f"config: {' and '.join(self.key(k) for k in found)} are one key (keys match "
                              f"regardless of case); keep one")
        return found[0] if found else None

    def _take(self, name: str) -> tuple[str, Any]:
        """The dotted key to name in messages, and the raw value (None when absent); marks the key read."""
        spelled = self.spelling(name)
        if spelled is None:
            return self.key(name), None
        self.read_keys.add(spelled)
        return self.key(spelled), self.data[spelled]

    def section(self, name: str) -> "ConfigReader":
        key, raw = self._take(name)
        child = ConfigReader(raw, key)
        self.children.append(child)
        return child

    def mapping(self, name: str, expect: str) -> dict:
        """A mapping read whole, its keys not checked here (librdkafka's properties, say)."""
        key, raw = self._take(name)
        if raw is None:
            return {}
        if not isinstance(raw, dict) or any(isinstance(v, (dict, list)) for v in raw.values()):
            raise ConfigError(f"config: {key} must be {expect}")
        return {str(k): v for k, v in raw.items()}

    def accept(self, *names: str) -> list[str]:
        """Mark keys that need no reading here as known; returns the dotted keys of those the file has."""
        found = []
        for name in names:
            spelled = self.spelling(name)
            if spelled is not None:
                self.read_keys.add(spelled)
                found.append(self.key(spelled))
        return found

    def value(self, name: str, kind: type, default: Any = MISSING, check: Callable[[Any], bool] | None = None,
              expect: str = "") -> Any:
        key, raw = self._take(name)
        if raw is None:
            if default is self.MISSING:
                raise ConfigError(f"config: {key} is required ({expect or kind.__name__})")
            return default
        got = "" if is_secret(name) else f", got {raw!r}"
        try:
            value = self._convert(raw, kind)
        except (TypeError, ValueError):
            raise ConfigError(f"config: {key} must be {expect or 'a ' + kind.__name__}{got}") from None
        if check is not None and not check(value):
            raise ConfigError(f"config: {key} must be {expect}{got}")
        return value

    @staticmethod
    def _convert(raw: Any, kind: type) -> Any:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "false"):
                return raw.lower() == "true"
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool) or not isinstance(raw, (int, str)):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
                raise ValueError(raw)
            return float(raw)
        if kind is str:
            if isinstance(raw, (dict, list)):
                raise ValueError(raw)
            return str(raw)
        if kind is list:
            if isinstance(raw, str):
                return [raw]
            if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                raise ValueError(raw)
            return list(raw)
        raise TypeError(kind)

    def unknown_keys(self) -> list[tuple[str, str | None]]:
        """Keys nobody read, each with the known key of its section it most likely misspells (or None)."""
        known = {name.lower(): name for name in self.known}
        found = []
        for k in self.data:
            if k in self.read_keys:
                continue
            nearest = difflib.get_close_matches(str(k).lower(), known, n=1, cutoff=0.8)
            found.append((self.key(k), self.key(known[nearest[0]]) if nearest else None))
        for child in self.children:
            found += child.unknown_keys()
        return found


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """'http://h:p', 'h:p' or 'h' to (h, p)."""
    if "://" in address:
        parsed = urllib.parse.urlsplit(address)
        return parsed.hostname or "", parsed.port or default_port
    host, _, port = address.rpartition(":")
    if not host:
        return port, default_port
    return host.strip("[]"), int(port)


def parse_mysql_dsn(url: str) -> dict:
    """The Go driver's DSN ``user:pass@tcp(host:port)/db?charset=utf8`` or ``mysql://user:pass@host:port/db``."""
    if url.startswith("mysql://"):
        parsed = urllib.parse.urlsplit(url)
        params = dict(urllib.parse.parse_qsl(parsed.query))
        return {"host": parsed.hostname or "127.0.0.1", "port": parsed.port or 3306,
                "user": urllib.parse.unquote(parsed.username or "root"),
                "password": urllib.parse.unquote(parsed.password or ""),
                "database": parsed.path.lstrip("/"), "charset": params.get("charset", "utf8mb4")}
    match = re.fullmatch(r"(?:(?P<cred>.*)@)?(?P<net>[a-z]+)?(?:\((?P<addr>[^)]*)\))?/(?P<db>[^?]*)(?:\?(?P<q>.*))?",
                         url)
    if not match or not match.group("db"):
        raise ValueError(url)
    user, _, password = (match.group("cred") or "root").partition(":")
    net = match.group("net") or "tcp"
    if net != "tcp":
        raise ValueError(f"only tcp is supported, got {net}")
    host, port = split_host_port(match.group("addr") or "127.0.0.1:3306", 3306)
    params = dict(urllib.parse.parse_qsl(match.group("q") or ""))
    return {"host": host, "port": port, "user": user, "password": password, "database": match.group("db"),
            "charset": params.get("charset", "utf8mb4")}


def _endpoints(reader: ConfigReader, name: str, default: list[str] | None) -> list[str] | None:
    """A list of etcd endpoints, ``host:port`` with or without ``http://``."""
    address = reader.value(name, list, default, lambda v: len(v) > 0,
                           "a list of etcd endpoints like http://127.0.0.1:2379")
    for endpoint in address or ():
        try:
            split_host_port(endpoint, 2379)
        except ValueError:
            raise ConfigError(f"config: {reader.key(name)} has an endpoint that is not host:port: "
                              f"{endpoint!r}") from None
    return address


def _read_etcd(reader: ConfigReader, default_address: list[str], older: tuple[str, list[str]] | None = None
               ) -> EtcdSettings:
    """One etcd's settings; ``older`` is the Go CDC v1.0.0 spelling of its endpoints (dotted key, endpoints)
    when the file has it."""
    address = _endpoints(reader, "address", None)
    if older is not None:
        older_key, older_address = older
        if address is not None and \
                {split_host_port(e, 2379) for e in address} != {split_host_port(e, 2379) for e in older_address}:
            raise ConfigError(f"config: {reader.key('address')} ({', '.join(address)}) and {older_key} "
                              f"({', '.join(older_address)}) disagree; keep one")
        address = older_address
    address = address or default_address
    auth = reader.value("enableAuth", bool, False)
    tls = reader.value("enableTLS", bool, False)
    settings = EtcdSettings(
        endpoints=tuple(address),
        username=reader.value("username", str, "") if auth else "",
        password=reader.value("password", str, "") if auth else "",
        tls=tls,
        cert=reader.value("tlsCertPath", str, ""), key=reader.value("tlsKeyPath", str, ""),
        ca_cert=reader.value("tlsCACertPath", str, ""),
        tls_min_version=reader.value("tlsMinVersion", str, "", lambda v: v in TLS_VERSIONS,
                                     f"one of {', '.join(TLS_VERSIONS)}"))
    if not auth:
        reader.value("username", str, "")
        reader.value("password", str, "")
    if auth and not settings.username:
        raise ConfigError(f"config: {reader.key('username')} is required when enableAuth is true")
    if tls:
        for key, path in (("tlsCertPath", settings.cert), ("tlsKeyPath", settings.key),
                          ("tlsCACertPath", settings.ca_cert)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"config: {reader.key(key)} names a file that does not exist: {path}")
    return settings


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI")  # those kafka-python can use from a file

# The librdkafka properties of the Go CDC's sourceConfig.kafka.consumer that kafka-python's KafkaConsumer has an
# equivalent for: property -> (option, kind), a kind being a type, the words allowed, or a word -> value mapping.
# Others (group, commits, offset reset: the reader assigns partitions and seeks itself) are named as not used.
KAFKA_CONSUMER_PROPERTIES: dict[str, tuple[str, Any]] = {
    "client.id": ("client_id", str),
    "client.rack": ("client_rack", str),
    "fetch.max.bytes": ("fetch_max_bytes", int),
    "max.partition.fetch.bytes": ("max_partition_fetch_bytes", int),
    "fetch.min.bytes": ("fetch_min_bytes", int),
    "fetch.wait.max.ms": ("fetch_max_wait_ms", int),
    "receive.message.max.bytes": ("receive_message_max_bytes", int),
    "socket.receive.buffer.bytes": ("receive_buffer_bytes", int),
    "socket.send.buffer.bytes": ("send_buffer_bytes", int),
    "max.in.flight.requests.per.connection": ("max_in_flight_requests_per_connection", int),
    "max.in.flight": ("max_in_flight_requests_per_connection", int),
    "metadata.max.age.ms": ("metadata_max_age_ms", int),
    "connections.max.idle.ms": ("connections_max_idle_ms", int),
    "reconnect.backoff.ms": ("reconnect_backoff_ms", int),
    "reconnect.backoff.max.ms": ("reconnect_backoff_max_ms", int),
    "retry.backoff.ms": ("retry_backoff_ms", int),
    "check.crcs": ("check_crcs", bool),
    "isolation.level": ("isolation_level", ("read_committed", "read_uncommitted")),
    "security.protocol": ("security_protocol", SECURITY_PROTOCOLS),
    "sasl.mechanisms": ("sasl_mechanism", SASL_MECHANISMS),
    "sasl.mechanism": ("sasl_mechanism", SASL_MECHANISMS),
    "sasl.username": ("sasl_plain_username", str),
    "sasl.password": ("sasl_plain_password", str),
    "sasl.kerberos.service.name": ("sasl_kerberos_service_name", str),
    "ssl.ca.location": ("ssl_cafile", str),
    "ssl.certificate.location": ("ssl_certfile", str),
    "ssl.key.location": ("ssl_keyfile", str),
    "ssl.key.password": ("ssl_password", str),
    "ssl.crl.location": ("ssl_crlfile", str),
    "ssl.cipher.suites": ("ssl_ciphers", str),
    "ssl.endpoint.identification.algorithm": ("ssl_check_hostname", {"https": True, "none": False}),
}
KAFKA_FILE_OPTIONS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile")


def _one_of(key: str, raw: Any, words: tuple[str, ...]) -> str:
    """``raw`` as the one of ``words`` it names, in any case (librdkafka's own matching)."""
    chosen = {word.lower(): word for word in words}.get(str(raw).lower())
    if chosen is None:
        raise ConfigError(f"config: {key} must be one of {', '.join(words)}, got {raw!r}")
    return chosen


def _read_kafka(reader: ConfigReader) -> tuple[dict, str]:
    """sourceConfig.kafka: the brokers, SASL (the Go CDC's flat keys, or the nested ``sasl`` this CDC read first)
    and the ``consumer`` map's properties as kafka-python options. Also returns a note naming the keys not used
    here (empty when there are none)."""
    address = reader.value("address", str, expect="host:port of a Kafka broker")
    nested = reader.section("sasl")
    sasl = {}
    for flat, inner in (("saslUsername", "username"), ("saslPassword", "password"),
                        ("saslMechanisms", "mechanisms"), ("securityProtocol", "securityProtocol")):
        one, other = reader.value(flat, str, ""), nested.value(inner, str, "")
        if one and other and one != other:
            raise ConfigError(f"config: {reader.key(flat)} and {nested.key(inner)} disagree; keep one")
        sasl[inner] = one or other
    if bool(sasl["username"]) != bool(sasl["password"]):
        raise ConfigError(f"config: {reader.key('saslUsername')} and {reader.key('saslPassword')} go together "
                          f"(SASL needs both); set both or neither")
    if sasl["mechanisms"]:
        sasl["mechanisms"] = _one_of(reader.key("saslMechanisms"), sasl["mechanisms"], SASL_MECHANISMS)
    if sasl["securityProtocol"]:
        sasl["securityProtocol"] = _one_of(reader.key("securityProtocol"), sasl["securityProtocol"],
                                           SECURITY_PROTOCOLS)
    expect = "a mapping of librdkafka properties to values, like client.id: cdc"
    consumer_key, producer_key = reader.key("consumer"), reader.key("producer")
    consumer: dict[str, Any] = {}
    unused_producer = [f"{producer_key}.{name}" for name in reader.mapping("producer", expect)]
    unused_consumer = []
    for name, raw in reader.mapping("consumer", expect).items():
        key = f"{consumer_key}.{name}"
        # ssl.ca.location "probe" asks for the system's CAs: kafka-python's default
        if name not in KAFKA_CONSUMER_PROPERTIES or raw is None or (name, raw) == ("ssl.ca.location", "probe"):
            unused_consumer.append(key)
            continue
        option, kind = KAFKA_CONSUMER_PROPERTIES[name]
        if isinstance(kind, tuple):
            consumer[option] = _one_of(key, raw, kind)
        elif isinstance(kind, dict):
            consumer[option] = kind.get(str(raw).lower())
            if consumer[option] is None:
                raise ConfigError(f"config: {key} must be one of {', '.join(kind)}, got {raw!r}")
        else:
            try:
                consumer[option] = ConfigReader._convert(raw, kind)
            except ValueError:
                raise ConfigError(f"config: {key} must be a {kind.__name__}"
                                  + ("" if is_secret(name) else f", got {raw!r}")) from None
        if option in KAFKA_FILE_OPTIONS and not os.path.isfile(consumer[option]):
            raise ConfigError(f"config: {key} names a file that does not exist: {consumer[option]}")
    reasons = []
    if unused_producer:
        reasons.append(f"{', '.join(unused_producer)} (this CDC never writes to the source's Kafka)")
    if unused_consumer:
        reasons.append(f"{', '.join(unused_consumer)} (kafka-python has no such option, or the reader sets it "
                       f"itself: it assigns partitions and seeks, in no consumer group)")
    note = f"config: not used here: {'; '.join(reasons)}" if reasons else ""
    return {"address": address, "sasl": sasl, "consumer": consumer}, note


def log_level_name(level: str) -> str | None:
    """A level as the config and the Go CDC spell it (debug, info, warn, warning, error), as logging names it."""
    name = {"WARN": "WARNING"}.get(level.upper(), level.upper())
    return name if name in ("DEBUG", "INFO", "WARNING", "ERROR") else None


def load_config(path: str) -> tuple[ServerConfig, list[tuple[int, str]]]:
    """Parse and check the config file. Returns the config and the lines to log about it, as (logging level,
    text): a warning for each key it does not know, a note naming the Go CDC keys it accepts with no use here."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from None
    root = ConfigReader(data)

    address = root.value("address", str, "0.0.0.0:8444", expect="host:port like 0.0.0.0:8444")
    try:
        host, port = split_host_port(address, 8444)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"config: address must be host:port like 0.0.0.0:8444, got {address!r}") from None
    max_task_num = root.value("maxTaskNum", int, 100, lambda v: v >= 1, "an integer >= 1")
    max_name_length = root.value("maxNameLength", int, 256, lambda v: v >= 1, "an integer >= 1")
    api_token = root.value("apiToken", str, "", lambda v: v == "" or len(v) >= 16,
                           "empty (no authentication) or a secret of at least 16 characters")
    log_level = root.value("logLevel", str, "info", lambda v: log_level_name(v) is not None,
                           "one of debug, info, warning, error")
    messages: list[tuple[int, str]] = []
    # The Go CDC's own workings (deadlock detection, its message packer and retries, Milvus batch mode, the
    # reverse replication v1.0.0 could set up): accepted so its configs start here unchanged, and named once.
    go_only = root.accept("detectDeadLock", "batchMode", "replicateID", "packer", "retry", "enableReverse",
                          "reverseMilvus", "currentMilvus", "dryRun")
    if root.value("dryRun", bool, False):
        raise ConfigError("config: dryRun is true, but this CDC has no dry run (its tasks write to their "
                          "targets); remove dryRun or set it false")
    if root.value("enableReverse", bool, False):
        messages.append((logging.WARNING, "config: enableReverse is true, but this CDC does not replicate back "
                                          "from the target; run a second CDC with the roles swapped for that"))

    meta = root.section("metaStoreConfig")
    # Matched exactly, as the Go CDC does (a switch on "mysql" and "etcd"): its configs spell them so.
    store_type = StoreType(meta.value("storeType", str, StoreType.SQLITE.value,
                                      lambda v: v in {t.value for t in StoreType},
                                      f"one of {', '.join(StoreType)}"))
    root_path = meta.value("rootPath", str, "cdc", lambda v: bool(v.strip("/")), "a non-empty path like cdc")
    sqlite_path = meta.value("sqlitePath", str, "cdc_meta.db")
    mysql: dict = {}
    mysql_url = meta.value("mysqlSourceUrl", str, "")
    if store_type == StoreType.MYSQL:
        if not mysql_url:
            raise ConfigError("config: metaStoreConfig.mysqlSourceUrl is required when storeType is mysql "
                              "(like root:root@tcp(127.0.0.1:3306)/milvus-cdc?charset=utf8)")
        try:
            mysql = parse_mysql_dsn(mysql_url)
        except ValueError:
            raise ConfigError("config: metaStoreConfig.mysqlSourceUrl must look like "
                              "user:password@tcp(host:port)/database?charset=utf8") from None
    meta_etcd = None
    etcd_reader = meta.section("etcd")
    if store_type == StoreType.ETCD:
        endpoints = _endpoints(meta, "etcdEndpoints", None)  # the Go CDC v1.0.0's spelling of etcd.address
        meta_etcd = _read_etcd(etcd_reader, ["http://127.0.0.1:2379"],
                               (meta.key("etcdEndpoints"), endpoints) if endpoints else None)
        go_only += etcd_reader.accept("rootPath", "metaSubPath")  # the store's prefix is metaStoreConfig.rootPath
    else:  # kept for a later switch of storeType; not an error
        etcd_reader.read_keys.update(etcd_reader.data)
        meta.accept("etcdEndpoints")
    meta_store = MetaStoreSettings(store_type, root_path.strip("/"), sqlite_path, mysql, meta_etcd)

    src = root.section("sourceConfig")
    src_etcd_reader = src.section("etcd")
    endpoints = _endpoints(src, "etcdAddress", None)  # the Go CDC v1.0.0's spelling of etcd.address
    src_etcd = _read_etcd(src_etcd_reader, ["http://127.0.0.1:2379"],
                          (src.key("etcdAddress"), endpoints) if endpoints else None)
    go_only += src.accept("channelNum", "timeTickInterval")
    old_root = src.value("etcdRootPath", str, "")
    old_meta = src.value("etcdMetaSubPath", str, "")
    new_root = src_etcd_reader.value("rootPath", str, "")
    new_meta = src_etcd_reader.value("metaSubPath", str, "")
    for new, old, new_key, old_key in ((new_root, old_root, "etcd.rootPath", "etcdRootPath"),
                                       (new_meta, old_meta, "etcd.metaSubPath", "etcdMetaSubPath")):
        if new and old and new != old:
            raise ConfigError(f"config: sourceConfig.{new_key} ({new!r}) and sourceConfig.{old_key} ({old!r}) "
                              f"disagree; keep one")
    read_chan_len = src.value("readChanLen", int, 4, lambda v: 1 <= v <= 100000, "an integer from 1 to 100000")
    kafka_reader, pulsar_reader = src.section("kafka"), src.section("pulsar")
    kafka: dict = {}
    pulsar: dict = {}
    if kafka_reader.data:
        kafka, note = _read_kafka(kafka_reader)
        if note:
            messages.append((logging.INFO, note))
    if pulsar_reader.data:
        web = pulsar_reader.accept("webAddress", "webPort", "port")
        if web:
            messages.append((logging.INFO, f"config: {', '.join(web)} not needed here: this CDC reads through "
                                           f"the broker's pulsar:// address"))
        pulsar = {"address": pulsar_reader.value("address", str, expect="a pulsar:// URL"),
                  "maxMessageSize": pulsar_reader.value("maxMessageSize", int, 5242880, lambda v: v > 0,
                                                        "a positive integer"),
                  "tenant": pulsar_reader.value("tenant", str, "public"),
                  "namespace": pulsar_reader.value("namespace", str, "default"),
                  "authPlugin": pulsar_reader.value("authPlugin", str, ""),
                  "authParams": pulsar_reader.value("authParams", str, "")}
        if not pulsar["address"].startswith(("pulsar://", "pulsar+ssl://")):
            raise ConfigError(f"config: sourceConfig.pulsar.address must be a pulsar:// URL, "
                              f"got {pulsar['address']!r}")
    if kafka and pulsar:
        raise ConfigError("config: sourceConfig has both kafka and pulsar; keep the one the source Milvus uses")
    if not kafka and not pulsar:
        raise ConfigError("config: sourceConfig needs kafka.address or pulsar.address (the source Milvus's MQ)")
    src_milvus = src.section("milvus")
    milvus_uri = src_milvus.value("uri", str, "", lambda v: not v or "://" in v, "a URI like http://host:19530")
    milvus_token = src_milvus.value("token", str, "")
    source = SourceSettings(
        etcd=src_etcd, root_path=(new_root or old_root or "by-dev").strip("/"),
        meta_sub_path=(new_meta or old_meta or "meta").strip("/"),
        default_partition_name=src.value("defaultPartitionName", str, "_default"),
        read_chan_len=read_chan_len,
        replicate_chan=src.value("replicateChan", str, "by-dev-replicate-msg", lambda v: bool(v), "a channel name"),
        mq_type=MqType.KAFKA if kafka else MqType.PULSAR, kafka=kafka, pulsar=pulsar, milvus_uri=milvus_uri,
        milvus_token=milvus_token)

    rep = root.section("replication")
    replication = ReplicationSettings(
        checkpoint_interval=rep.value("checkpointInterval", float, 0.2, lambda v: 0.01 <= v <= 60,
                                      "a number of seconds from 0.01 to 60"),
        retry_timeout=rep.value("retryTimeout", float, 600.0, lambda v: v >= 0, "a number of seconds >= 0"),
        retry_max_backoff=rep.value("retryMaxBackoff", float, 10.0, lambda v: v > 0, "a number of seconds > 0"),
        write_ahead=rep.value("writeAhead", int, 4, lambda v: 1 <= v <= 64, "an integer from 1 to 64"),
        calls_per_channel=rep.value("callsPerChannel", int, 1, lambda v: 1 <= v <= 16, "an integer from 1 to 16"))
    cluster_reader = root.section("cluster")
    cluster = None
    if cluster_reader.value("enabled", bool, False):
        shared = [kind for kind, store in META_STORES.items() if issubclass(store, LeaseStore)]
        if store_type not in shared:
            raise ConfigError(f"config: cluster.enabled needs metaStoreConfig.storeType {' or '.join(shared)} (the "
                              f"servers share its tasks); {store_type} is for one server")
        server_id = cluster_reader.value("serverId", str, "") or \
            f"{socket.gethostname() if host in ('0.0.0.0', '::', '') else host}:{port}"
        cluster = ClusterSettings(server_id, cluster_reader.value(
            "leaseTTL", float, 10.0, lambda v: 3 <= v <= 300, "a number of seconds from 3 to 300"))
    else:
        cluster_reader.read_keys.update(cluster_reader.data)
    config = ServerConfig(host, port, max_task_num, max_name_length, log_level_name(log_level) or "INFO",
                          meta_store, source, replication, api_token, cluster)
    if go_only:
        messages.append((logging.INFO, f"config: Go CDC keys not needed here, accepted and ignored: "
                                       f"{', '.join(go_only)}"))
    for key, nearest in root.unknown_keys():
        messages.append((logging.WARNING, f"config: unknown key {key} ignored"
                                          + (f"; did you mean {nearest}?" if nearest else "")))
    return config, messages


###############################################################################
# Faults: what is waited out, and what a task shows meanwhile ##################
###############################################################################

class TaskStopping(Exception):
    """The task is being paused, deleted or shut down while a call waited; not an error."""


class TaskHalt(Exception):
    """The task cannot go on: it pauses at once with this reason (a refusal nothing explains, or a fault that
    outlived retryTimeout)."""


class StartRefused(TaskHalt):
    """The task cannot start as its create request asks (the request must change): create answers 400."""


TRANSIENT_GRPC = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL",
                            "UNKNOWN", "CANCELLED"})


def etcd_fault(error: BaseException) -> bool:
    """Is this an etcd failure that waiting can cure (unreachable, timed out, restarting)?"""
    import grpc
    import pyetcd.exceptions as errors
    if isinstance(error, (errors.ConnectionFailedError, errors.ConnectionTimeoutError, errors.InternalServerError,
                          errors.NoServerAvailableError)):
        return True
    return isinstance(error, grpc.RpcError) and error.code().name in TRANSIENT_GRPC


class TransientError(Exception):
    """One failed try that may succeed later (network, a server not ready, rate limit)."""


@dataclass(frozen=True)
class Wait:
    """A fault a task is waiting out, as `get` shows it."""
    operation: str
    since: float
    tries: int
    last_error: str

    def public(self) -> dict:
        return {"operation": self.operation, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
                "tries": self.tries, "last_error": self.last_error}


class Waits:
    """The faults a task's threads wait out right now, one per thread role (applier, reader, catalog...)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current: dict[str, Wait] = {}

    def set(self, role: str, wait: Wait) -> None:
        with self.lock:
            self.current[role] = wait

    def clear(self, role: str) -> None:
        with self.lock:
            self.current.pop(role, None)

    def of(self, role: str) -> Wait | None:
        with self.lock:
            return self.current.get(role)

    def snapshot(self) -> list[Wait]:
        with self.lock:
            return sorted(self.current.values(), key=lambda w: w.since)


def describe_error(error: BaseException) -> str:
    return str(error) if isinstance(error, TransientError) else f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class RetryPolicy:
    """How far apart and for how long every fault of the server is retried: ``replication.retryMaxBackoff`` and
    ``replication.retryTimeout``. The server makes one and hands it to every part that retries, so that a change
    of either setting reaches every retry, and a change of the policy is made here only.

    The waits double from FIRST up to ``max_backoff`` (tenacity's exponential wait). A retry that is one call
    is ``retrying``'s (Patience); a loop that waits on something of its own (a stop event, a condition) or that
    schedules its next try asks ``delay``."""

    timeout: float = 600.0
    max_backoff: float = 10.0

    FIRST = 0.5  # seconds after the first failed try: a blip costs little, a restarting server is not hammered

    @classmethod
    def of(cls, settings: ReplicationSettings) -> RetryPolicy:
        return cls(settings.retry_timeout, settings.retry_max_backoff)

    def _wait(self) -> Any:
        import tenacity
        # no floor: tenacity's min would win over max, and a retryMaxBackoff below FIRST must still bound every wait
        return tenacity.wait_exponential(multiplier=self.FIRST, max=self.max_backoff)

    def delay(self, tries: int) -> float:
        """The wait after the ``tries``-th failed try in a row (counted from 1)."""
        import tenacity
        state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        state.attempt_number = max(1, tries)
        return float(self._wait()(state))

    def expired(self, since: float) -> bool:
        """Has a fault failing since ``since`` (time.time()) outlived retryTimeout?"""
        return time.time() - since > self.timeout

    def retrying(self, **hooks: Any) -> Any:
        """A tenacity.Retrying that stops after retryTimeout and waits as ``delay`` says; ``hooks`` say what is
        retried, how the waits are slept and what is shown meanwhile."""
        import tenacity
        return tenacity.Retrying(stop=tenacity.stop_after_delay(self.timeout), wait=self._wait(), **hooks)


class Patience:
    """Waits out transient faults of one thread of a task: each failing try is retried as the server's
    RetryPolicy says, then the task halts with the last error. A stop of the task ends the wait at once. While it
    waits, `get` shows the operation, since when and how many tries."""

    def __init__(self, retry: RetryPolicy, stop: threading.Event, waits: Waits, role: str, task_id: str):
        self.retry, self.stop, self.waits, self.role, self.task_id = retry, stop, waits, role, task_id

    def run(self, operation: str, attempt: Callable[[], Any], transient: Callable[[BaseException], bool],
            pause: Callable[[float], None] | None = None) -> Any:
        import tenacity
        started = time.time()

        def note(state) -> None:
            error = describe_error(state.outcome.exception())
            self.waits.set(self.role, Wait(operation, started, state.attempt_number, error))
            log.warning("task=%s retrying %s (try %d): %s", self.task_id, operation, state.attempt_number, error)

        def sleep(seconds: float) -> None:
            (pause or self.stop.wait)(seconds)
            if self.stop.is_set():
                raise TaskStopping()

        def first(*_) -> None:
            if self.stop.is_set():
                raise TaskStopping()

        retrying = self.retry.retrying(retry=tenacity.retry_if_exception(transient), before=first, sleep=sleep,
                                       before_sleep=note, reraise=True)
        try:
            return retrying(attempt)
        except TaskStopping:
            raise
        except BaseException as exc:
            if transient(exc):
                raise TaskHalt(f"{operation}: {describe_error(exc)} (retried for "
                               f"{time.time() - started:.0f}s)") from None
            raise
        finally:
            self.waits.clear(self.role)


###############################################################################
# Metrics ######################################################################
###############################################################################

class Stage(enum.Enum):
    """Where a change is on its way from the source to the target, as the stage-lag histogram tells them apart:
    each is observed when that stage's source time moves, as how far it is then behind the source's clock."""
    TICK_READ = "tick_read"                      # a source time tick read from a data channel
    CATALOG_PROMISED = "catalog_promised"        # the catalog polled up to a time
    OPERATIONS_PROMISED = "operations_promised"  # the replicate channel read to its end up to a time
    ORDERED = "ordered"                          # every input promised up to a time: what is below it is applied
    SENT = "sent"                                # a round handed to the send lanes
    ACKNOWLEDGED = "acknowledged"                # the target took every message of the round
    CHECKPOINTED = "checkpointed"                # the meta store holds the checkpoint
    TICKED = "ticked"                            # the target ticked up to it: the rows are visible


class Metrics:
    """The server's Prometheus metrics, in a registry of its own, served on ``GET /metrics`` (prometheus_client
    writes the exposition). Counters and histograms are fed where things happen, through a TaskMetrics per
    task; what describes a task's present (state, lag, checkpoint age, queue depth) is read from the task
    manager at scrape time."""

    CALL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    LAG_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry()

        def counter(name: str, doc: str, labels: list[str]):
            return Counter(name, doc, labels, registry=self.registry)
        self.rows = counter("milvus_cdc_replicated_rows", "Rows written to the target, by operation (insert, delete)",
                            ["task_id", "collection", "op"])
        self.bytes = counter("milvus_cdc_replicated_bytes", "Bytes of messages written to the target",
                             ["task_id", "collection", "op"])
        self.ddl = counter("milvus_cdc_ddl_operations", "DDL calls applied on the target, by Milvus RPC",
                           ["task_id", "operation"])
        self.messages = counter("milvus_cdc_messages_read", "Messages read from a source channel (time ticks "
                                "included)", ["task_id", "channel"])
        self.retries = counter("milvus_cdc_target_retries", "Target calls tried again after a transient error",
                               ["task_id", "operation", "code"])
        self.failures = counter("milvus_cdc_target_failures", "Target calls refused (repaired or not) or failed "
                                "for good", ["task_id", "operation", "code"])
        self.call_seconds = Histogram("milvus_cdc_target_call_seconds", "Time of one call to the target",
                                      ["operation"], buckets=self.CALL_BUCKETS, registry=self.registry)
        self.stage_lag = Histogram("milvus_cdc_stage_lag_seconds", "How far behind the source's clock a stage "
                                   "was when it moved (Stage: from a tick read to the target's tick)", ["stage"],
                                   buckets=self.LAG_BUCKETS, registry=self.registry)
        self.store_writes = counter("milvus_cdc_meta_store_writes", "Writes to the meta store, by what and outcome",
                                    ["kind", "outcome"])
        self.api_requests = counter("milvus_cdc_api_requests", "Requests to /cdc by request_type and code",
                                    ["request_type", "code"])
        self.api_seconds = Histogram("milvus_cdc_api_request_seconds", "Time to answer a request to /cdc",
                                     ["request_type"], buckets=self.CALL_BUCKETS, registry=self.registry)
        self.verify_result = Gauge("milvus_cdc_verify_result", "The last verify run of a task: 1 for its result "
                                   "(equal, different, failed), 0 for the others", ["task_id", "result"],
                                   registry=self.registry)
        self.verify_rows = Gauge("milvus_cdc_verify_differing_rows", "Rows that differ, as the last verify run "
                                 "of a task found", ["task_id"], registry=self.registry)
        self.verify_compared = Gauge("milvus_cdc_verify_rows_compared", "Rows the last verify run of a task "
                                     "compared", ["task_id"], registry=self.registry)
        self.verify_seconds = Gauge("milvus_cdc_verify_seconds", "Duration of the last verify run of a task",
                                    ["task_id"], registry=self.registry)
        self.lock = threading.Lock()
        self.series: dict[str, set[tuple]] = defaultdict(set)  # task id -> (metric, labels) it fed

    def verified(self, task_id: str, run: "Verification") -> None:
        for state in VerifyState:
            if state != VerifyState.RUNNING:
                self._note(task_id, self.verify_result, (task_id, state.value)).set(float(run.state == state))
        self._note(task_id, self.verify_rows, (task_id,)).set(sum(d.count for d in run.differences))
        self._note(task_id, self.verify_compared, (task_id,)).set(run.rows_compared)
        self._note(task_id, self.verify_seconds, (task_id,)).set(run.seconds())

    def reached(self, stage: Stage, ts: int) -> None:
        """A stage moved up to source time ``ts``."""
        self.stage_lag.labels(stage.value).observe(max(0.0, time.time() - ts_seconds(ts)))

    def task(self, task_id: str) -> "TaskMetrics":
        return TaskMetrics(self, task_id)

    def _note(self, task_id: str, metric, labels: tuple) -> Any:
        with self.lock:
            self.series[task_id].add((metric, labels))
        return metric.labels(*labels)

    def forget(self, task_id: str) -> None:
        """A deleted task's series go too."""
        with self.lock:
            series = self.series.pop(task_id, set())
        for metric, labels in series:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TaskMetrics:
    """The metrics of one task."""

    def __init__(self, metrics: Metrics, task_id: str):
        self.m, self.task_id = metrics, task_id

    def replicated(self, collection: str, op: str, rows: int, size: int) -> None:
        self.m._note(self.task_id, self.m.rows, (self.task_id, collection, op)).inc(rows)
        self.m._note(self.task_id, self.m.bytes, (self.task_id, collection, op)).inc(size)

    def ddl(self, operation: str) -> None:
        self.m._note(self.task_id, self.m.ddl, (self.task_id, operation)).inc()

    def read(self, counts: dict[str, int]) -> None:
        for channel, count in counts.items():
            self.m._note(self.task_id, self.m.messages, (self.task_id, channel)).inc(count)

    def retried(self, operation: str, code: str) -> None:
        self.m._note(self.task_id, self.m.retries, (self.task_id, operation, code)).inc()

    def failed(self, operation: str, code: str) -> None:
        self.m._note(self.task_id, self.m.failures, (self.task_id, operation, code)).inc()

    def call_time(self, operation: str, seconds: float) -> None:
        self.m.call_seconds.labels(operation).observe(seconds)

    def reached(self, stage: Stage, ts: int) -> None:
        self.m.reached(stage, ts)


###############################################################################
# Meta store ###################################################################
###############################################################################

class StartKind(enum.StrEnum):
    """Where a reader starts on a channel (StartAt): AFTER or AT a message id, or at the LATEST or EARLIEST end of
    the channel; a checkpoint resumes only AFTER or AT. A StrEnum, so the stored checkpoints and the API keep the
    words they had."""
    AFTER = "after"
    AT = "at"
    LATEST = "latest"
    EARLIEST = "earliest"


@dataclass(frozen=True, order=True)
class Checkpoint:
    """How far one source channel is replicated: the reader resumes after (or at) ``msg_id``, and every message
    of the channel with a timestamp at or below ``timestamp`` is already on the target."""
    channel: str
    msg_id: bytes
    timestamp: int
    resume: StartKind = StartKind.AFTER  # AT until the first message of a freshly started channel is confirmed
    # The messages after the resume position that are on the target already: the replicate channel is not in
    # timestamp order (an operation is written when it finished), so only their positions tell them apart.
    applied: tuple[bytes, ...] = ()

    def to_json(self) -> dict:
        shown = {"channel": self.channel, "msg_id": base64.b64encode(self.msg_id).decode(),
                 "timestamp": self.timestamp, "resume": self.resume.value}
        if self.applied:
            shown["applied"] = [base64.b64encode(p).decode() for p in self.applied]
        return shown

    @classmethod
    def from_json(cls, data: dict) -> "Checkpoint":
        return cls(data["channel"], base64.b64decode(data["msg_id"]), int(data["timestamp"]),
                   StartKind(data.get("resume", StartKind.AFTER.value)),
                   tuple(base64.b64decode(p) for p in data.get("applied", ())))


class MetaStoreUnavailable(Exception):
    """The meta store did not answer (down, restarting, cut off); nothing was written. The API answers 503 and a
    task tries again later: nothing is lost, since the target is never ticked past what is stored."""


class MetaStoreInUse(Exception):
    """The embedded store's file is another server's."""


class LeaseLost(Exception):
    """This server no longer holds the lease on a target: its tasks there stop before anything else is written."""


@dataclass
class Lease:
    """This server's hold on the targets it owns, as the meta store granted it (one lease per server run).

    ``valid`` is the local fence: true only until the start of the last successful renewal plus the TTL, less a
    margin, so a server that stalls (GC pause, SIGSTOP, a cut to the store) stops writing before anyone else may
    have taken over, even before it learns from the store that it lost."""
    server_id: str
    token: str          # what the store holds for this run of the server: f"{server_id}/{nonce}"
    ttl: float
    renewed_at: float   # time.monotonic() when the last successful grant or renewal was sent
    store_id: int = 0   # the etcd lease id
    gone: bool = False  # the store said it is over (or a target held with it is): never valid again

    MARGIN = 1.0

    def valid(self) -> bool:
        return not self.gone and time.monotonic() < self.renewed_at + self.ttl - self.MARGIN

    @staticmethod
    def server_of(token: str) -> str:
        return token.rsplit("/", 1)[0]


@dataclass(frozen=True)
class PositionsWrite:
    """One task's checkpoints to store; with ``fence`` (the lease, the target), only while that holds."""
    task_id: str
    document: str
    fence: tuple[Lease, str] | None = None


@dataclass(eq=False)
class _QueuedWrite:
    write: PositionsWrite
    outcome: bool | BaseException | None = None  # written, fenced off, or why not; None while queued


class TaskStore(ABC):
    """Where tasks and their checkpoints live: what the task manager and each task's applier ask of a store.

    Every call is one atomic read or write of the tasks under this store's rootPath (several CDC servers, or
    tenants, share one store through their rootPath; they never see each other's tasks). Every method may raise
    MetaStoreUnavailable: the store did not answer, nothing was written, and the same call may be made again
    later (the API answers 503 meanwhile). Other exceptions are faults, not waits. Task documents are JSON
    objects; a task's checkpoints are read and written as one set, never channel by channel.
    """

    @abstractmethod
    def ping(self) -> None:
        """One cheap read; returns once the store answers (MetaStoreUnavailable when it does not)."""

    @abstractmethod
    def create_task(self, task_id: str, info: dict) -> bool:
        """Store a new task; False, with nothing written, when the id is taken."""

    @abstractmethod
    def save_task(self, task_id: str, info: dict) -> None:
        """Write the task's document over whatever is stored (update_task when others may write it too). Like
        every write of a task here, it is conditional on the document it replaces: a write that was not answered
        but lands later (a frozen etcd applies what it had received once it runs again) never lands over a
        newer one."""

    @abstractmethod
    def update_task(self, task_id: str, change: Callable[[dict], dict]) -> dict | None:
        """Read the task, pass it to ``change`` and write what it returns only if nobody wrote the task
        meanwhile (else read again and call ``change`` again): one server never undoes another's pause, resume
        or delete. ``change`` may raise to refuse; its exception passes through, nothing written. Returns the
        document written, or None when the task is gone. MetaStoreUnavailable also when others kept writing
        the task through every try."""

    @abstractmethod
    def load_tasks(self) -> dict[str, dict]:
        """Every task of this rootPath: task id -> its document."""

    @abstractmethod
    def delete_task(self, task_id: str) -> None:
        """Remove the task and its checkpoints together; a task that is not there is no error. Conditional on
        the document it removes, as save_task is."""

    @abstractmethod
    def save_checkpoints(self, task_id: str, checkpoints: Iterable[Checkpoint],
                         fence: tuple[Lease, str] | None = None) -> None:
        """Replace the task's whole set of checkpoints in one write. With ``fence`` (a lease this store granted
        as a LeaseStore, and a target): only while that lease holds the target and the task still exists; else
        LeaseLost, nothing written. Only a store that is also a LeaseStore is given a fence."""

    @abstractmethod
    def load_checkpoints(self, task_id: str) -> dict[str, Checkpoint]:
        """The task's checkpoints by channel; empty when it has none (never started, or gone)."""

    @abstractmethod
    def close(self) -> None:
        """Give back connections, files and locks; the store is not used afterwards."""


class LeaseStore(ABC):
    """Leases on targets, for the servers of a cluster sharing one store's tasks (ClusterAgent; sqlite, for one
    server, has none). Litestream's Leaser is the model: one small job, kept apart from the tasks.

    A server joins with a lease of its own, renewed well within its ``ttl``; everything held with it (the
    server's presence in servers(), the targets it acquired) ends with it, when it expires in the store (by the
    store's clock), when the server leaves, or when the store says it is gone. A target is held by one live
    lease at a time. Lease.valid is the local fence over this: a server stops writing before the store could
    have let another take over. A checkpoint written with a fence (TaskStore.save_checkpoints) raises LeaseLost
    once the store no longer has the target held with the lease. Every method may raise MetaStoreUnavailable
    (the store did not answer); a lease that goes unrenewed meanwhile runs out by itself.
    """

    @abstractmethod
    def join(self, server_id: str, ttl: float) -> Lease:
        """Enter the cluster: a new lease for this run of the server (a new token each time, so nothing held
        with an earlier lease counts), and its presence in servers(). Its ``renewed_at`` is when the grant was
        asked for."""

    @abstractmethod
    def renew(self, lease: Lease, targets: Iterable[str] = ()) -> bool:
        """Keep the lease and every target held with it alive, and on success move ``lease.renewed_at`` to when
        the renewal was sent (never later: the local fence must not outlive the store's). False when the lease is
        gone, or one of ``targets`` (what the caller holds) is no longer held with it; then the caller stops
        writing to them."""

    @abstractmethod
    def servers(self) -> dict[str, str]:
        """The live servers: server id -> lease token."""

    @abstractmethod
    def acquire(self, lease: Lease, target: str) -> bool:
        """Take a target that no live lease holds, or that this lease holds already; False when another live
        lease holds it."""

    @abstractmethod
    def release(self, lease: Lease, target: str) -> None:
        """Give up a target held with this lease (others may take it at once); nothing when it is not held with
        it."""

    @abstractmethod
    def owners(self) -> dict[str, str]:
        """The targets held by live leases: target -> the id of the server holding it."""

    @abstractmethod
    def leave(self, lease: Lease) -> None:
        """Give up the lease and everything held with it (a clean shutdown: others take over at once, not after
        the TTL)."""


class MetaStore(TaskStore):
    """The TaskStore of every concrete store, over a few primitives each one gives (one atomic operation each):
    the JSON, the retries of update_task, the metrics and the group commit of checkpoints live here once.

    Layout, shared by every store: a task's info document under ``{rootPath}/task_info/{task_id}`` and all of
    its checkpoints, as one document, under ``{rootPath}/task_position/{task_id}``. A primitive's failure that
    waiting can cure (``_transient``) reaches the caller as MetaStoreUnavailable. Stores that share tasks
    between servers are LeaseStores as well.
    """

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: MetaStoreSettings) -> "MetaStore":
        """Open the store metaStoreConfig describes (open_meta_store chooses the class from META_STORES)."""

    def __init__(self, root_path: str):
        self.root_path = root_path
        self.metrics: Metrics | None = None  # counts the writes when set
        # Checkpoints of all the tasks of the server wait here for the next transaction (see save_checkpoints).
        self.queued: list[_QueuedWrite] = []
        self.queue_turn = threading.Condition()
        self.writing = False

    @abstractmethod
    def _load_tasks(self) -> dict[str, str]: ...

    @abstractmethod
    def _load_task(self, task_id: str) -> str | None: ...

    @abstractmethod
    def _insert_task(self, task_id: str, document: str) -> bool:
        """Write the task only if there is none of that id; False when there is."""

    @abstractmethod
    def _replace_task(self, task_id: str, before: str, after: str) -> bool:
        """Write ``after`` only if the task's document is still ``before``; False when it is not (or is gone)."""

    @abstractmethod
    def _delete_task(self, task_id: str, before: str | None) -> bool:
        """Remove the task and its checkpoints in one transaction, only if the task's document is still
        ``before`` (None: only if there is no document); False when it is not."""

    @abstractmethod
    def _save_positions(self, writes: list[PositionsWrite]) -> list[bool]:
        """Write these in one transaction; for each, False when its fence did not hold (then it is not written)."""

    @abstractmethod
    def _load_positions(self, task_id: str) -> str | None: ...

    @abstractmethod
    def _transient(self, error: BaseException) -> bool:
        """Is this failure the store being unreachable for now?"""

    def _guard(self, what: str, call: Callable[[], Any], write: str = "") -> Any:
        outcome = "error"
        try:
            result = call()
            outcome = "ok"
            return result
        except Exception as exc:
            if self._transient(exc):
                outcome = "unavailable"
                raise MetaStoreUnavailable(f"the meta store did not answer ({what}): {type(exc).__name__}: "
                                           f"{exc}") from None
            raise
        finally:
            if write and self.metrics is not None:
                self.metrics.store_writes.labels(write, outcome).inc()

    def ping(self) -> None:
        self._guard("answering", lambda: self._load_positions("-"))

    # Every task document written carries a stamp of its own, so that two writes never leave the same text:
    # compare-and-set on the text is then compare-and-set on the write (as etcd's mod_revision would be, in
    # a form every store can compare in one call). Readers never see the stamp.
    STAMP = "_write"

    def _encode(self, info: dict) -> str:
        return json.dumps({**info, self.STAMP: uuid.uuid4().hex})

    def _decode(self, document: str) -> dict:
        info = json.loads(document)
        info.pop(self.STAMP, None)
        return info

    def create_task(self, task_id: str, info: dict) -> bool:
        return self._guard("saving a task", lambda: self._insert_task(task_id, self._encode(info)), write="task")

    UPDATE_TRIES = 5

    def _rewrite(self, task_id: str, write: Callable[[str | None], bool], what: str, kind: str = "task") -> None:
        """Read the task's document and make ``write`` conditional on it, again while others write meanwhile."""
        for _ in range(self.UPDATE_TRIES):
            before = self._guard("loading a task", lambda: self._load_task(task_id))
            if self._guard(what, lambda: write(before), write=kind):
                return
        raise MetaStoreUnavailable(f"task {task_id} was changed by others {self.UPDATE_TRIES} times while this "
                                   f"change was written; try again")

    def save_task(self, task_id: str, info: dict) -> None:
        self._rewrite(task_id, lambda before: self._insert_task(task_id, self._encode(info)) if before is None
                      else self._replace_task(task_id, before, self._encode(info)), "saving a task")

    def update_task(self, task_id: str, change: Callable[[dict], dict]) -> dict | None:
        written: list[dict | None] = []

        def write(before: str | None) -> bool:
            if before is None:
                written.append(None)
                return True
            after = change(self._decode(before))
            written.append(after)
            return self._replace_task(task_id, before, self._encode(after))
        self._rewrite(task_id, write, "saving a task")
        return written[-1]

    def load_tasks(self) -> dict[str, dict]:
        return {task_id: self._decode(document)
                for task_id, document in self._guard("loading the tasks", self._load_tasks).items()}

    def delete_task(self, task_id: str) -> None:
        self._rewrite(task_id, lambda before: self._delete_task(task_id, before), "deleting a task", kind="delete")

    def save_checkpoints(self, task_id: str, checkpoints: Iterable[Checkpoint],
                         fence: tuple[Lease, str] | None = None) -> None:
        queued = _QueuedWrite(PositionsWrite(task_id, json.dumps([c.to_json() for c in sorted(checkpoints)]),
                                             fence))
        with self.queue_turn:
            self.queued.append(queued)
        # Group commit: whoever finds no write under way writes everything queued meanwhile, in one transaction,
        # so a server with maxTaskNum busy tasks writes its checkpoints a few times per interval, not once per task.
        while True:
            with self.queue_turn:
                self.queue_turn.wait_for(lambda: queued.outcome is not None or not self.writing)
                if queued.outcome is not None:
                    break
                self.writing = True
                batch = self._next_batch()
            self._write_batch(batch)
        if isinstance(queued.outcome, BaseException):
            raise copy.copy(queued.outcome)  # one error object per waiting thread: raising sets its traceback
        if not queued.outcome:
            raise LeaseLost(f"target {fence[1] if fence else ''} is no longer held by this server, or task "
                            f"{task_id} is gone")

    BATCH_WRITES, BATCH_BYTES = 64, 1 << 20  # within etcd's limits: 128 operations, 1.5 MiB per request

    def _next_batch(self) -> list[_QueuedWrite]:
        """The oldest queued writes, as many as one transaction takes (with the queue's condition held)."""
        size = count = 0
        for count, queued in enumerate(self.queued[:self.BATCH_WRITES], 1):
            size += len(queued.write.document)
            if size > self.BATCH_BYTES and count > 1:
                count -= 1
                break
        batch, self.queued = self.queued[:count], self.queued[count:]
        return batch

    def _write_batch(self, batch: list[_QueuedWrite]) -> None:
        # A task queued twice: its last set replaces the whole earlier one, which is not written (nor can etcd
        # take one key twice in a transaction).
        last = {queued.write.task_id: queued.write for queued in batch}
        outcomes: dict[str, bool | BaseException]
        try:
            written = self._guard("saving checkpoints", lambda: self._save_positions(list(last.values())),
                                  write="checkpoint")
            outcomes = dict(zip(last, written))
        except Exception as exc:  # noqa: BLE001 - handed to each writer, raised in its thread
            outcomes = dict.fromkeys(last, exc)
        with self.queue_turn:
            for queued in batch:
                queued.outcome = outcomes[queued.write.task_id]
            self.writing = False
            self.queue_turn.notify_all()

    def load_checkpoints(self, task_id: str) -> dict[str, Checkpoint]:
        document = self._guard("loading checkpoints", lambda: self._load_positions(task_id))
        if not document:
            return {}
        return {c.channel: c for c in map(Checkpoint.from_json, json.loads(document))}


class SqlMetaStore(MetaStore):
    """The SQL stores: tables ``task_info`` and ``task_position`` keyed by (root_path, task_id). Subclasses give
    the driver's transaction and dialect."""

    MARK = "%s"                  # the driver's parameter marker
    REPLACE = "REPLACE INTO"     # insert or overwrite by primary key
    INSERT_NEW = "INSERT IGNORE INTO"  # insert unless the primary key is there
    SAME_TEXT = "BINARY info = %s"     # byte for byte (MySQL's text collations ignore case and trailing blanks)
    TEXT = "LONGTEXT"
    KEY = "VARCHAR(255)"

    @abstractmethod
    def _begin(self):
        """A cursor inside a new transaction (on a connection of its own for the time of the transaction)."""

    @abstractmethod
    def _end(self, cursor, commit: bool) -> None:
        """Commit or roll back, and give the connection back."""

    @contextlib.contextmanager
    def _transaction(self):
        """A cursor whose statements commit together on success and roll back on error."""
        cursor = self._begin()
        try:
            yield cursor
        except BaseException:
            self._end(cursor, commit=False)
            raise
        self._end(cursor, commit=True)

    def _create_tables(self) -> None:
        with self._transaction() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS task_info (root_path {self.KEY} NOT NULL, task_id {self.KEY} "
                        f"NOT NULL, info {self.TEXT} NOT NULL, PRIMARY KEY (root_path, task_id))")
            cur.execute(f"CREATE TABLE IF NOT EXISTS task_position (root_path {self.KEY} NOT NULL, task_id "
                        f"{self.KEY} NOT NULL, positions {self.TEXT} NOT NULL, PRIMARY KEY (root_path, task_id))")

    def _save_positions(self, writes):
        m = self.MARK
        written = []
        with self._transaction() as cur:
            for write in writes:
                if write.fence is not None and not self._fence_holds(cur, write):
                    written.append(False)
                    continue
                cur.execute(f"{self.REPLACE} task_position VALUES ({m}, {m}, {m})",
                            (self.root_path, write.task_id, write.document))
                written.append(True)
        return written

    @abstractmethod
    def _fence_holds(self, cur, write: PositionsWrite) -> bool:
        """Inside the transaction: does this server hold the write's target, and does its task still exist?"""

    def _load_tasks(self):
        with self._transaction() as cur:
            cur.execute(f"SELECT task_id, info FROM task_info WHERE root_path = {self.MARK}", (self.root_path,))
            return dict(cur.fetchall())

    def _read_one(self, column: str, table: str, task_id: str) -> str | None:
        m = self.MARK
        with self._transaction() as cur:
            cur.execute(f"SELECT {column} FROM {table} WHERE root_path = {m} AND task_id = {m}",
                        (self.root_path, task_id))
            row = cur.fetchone()
        return row[0] if row else None

    def _load_task(self, task_id):
        return self._read_one("info", "task_info", task_id)

    def _insert_task(self, task_id, document):
        m = self.MARK
        with self._transaction() as cur:
            cur.execute(f"{self.INSERT_NEW} task_info VALUES ({m}, {m}, {m})", (self.root_path, task_id, document))
            return cur.rowcount == 1

    def _replace_task(self, task_id, before, after):
        m = self.MARK
        with self._transaction() as cur:
            cur.execute(f"UPDATE task_info SET info = {m} WHERE root_path = {m} AND task_id = {m} AND "
                        f"{self.SAME_TEXT}", (after, self.root_path, task_id, before))
            return cur.rowcount == 1

    def _load_positions(self, task_id):
        return self._read_one("positions", "task_position", task_id)

    def _delete_task(self, task_id, before):
        m = self.MARK
        with self._transaction() as cur:
            if before is None:
                cur.execute(f"SELECT 1 FROM task_info WHERE root_path = {m} AND task_id = {m}",
                            (self.root_path, task_id))
                if cur.fetchone() is not None:
                    return False
            else:
                cur.execute(f"DELETE FROM task_info WHERE root_path = {m} AND task_id = {m} AND {self.SAME_TEXT}",
                            (self.root_path, task_id, before))
                if cur.rowcount != 1:
                    return False
            cur.execute(f"DELETE FROM task_position WHERE root_path = {m} AND task_id = {m}", (self.root_path, task_id))
            return True


class SqliteMetaStore(SqlMetaStore):
    """The embedded default: one local file, no server to run. One connection, used by one thread at a time."""

    MARK, REPLACE, TEXT, KEY = "?", "INSERT OR REPLACE INTO", "TEXT", "TEXT"
    INSERT_NEW, SAME_TEXT = "INSERT OR IGNORE INTO", "info = ?"

    @classmethod
    def from_settings(cls, settings: MetaStoreSettings) -> "SqliteMetaStore":
        return cls(settings.sqlite_path, settings.root_path)

    def __init__(self, path: str, root_path: str):
        import fcntl
        super().__init__(root_path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Held while the server runs: one server per sqlite file and rootPath (tenants with their own rootPath
        # share a file safely, their rows never meet).
        tenant = hashlib.sha256(root_path.encode()).hexdigest()[:16]
        self.owner = open(f"{path}.{tenant}.lock", "a")
        try:
            fcntl.flock(self.owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.owner.close()
            raise MetaStoreInUse(f"another CDC server uses the sqlite meta store {path} with rootPath {root_path!r}; "
                                 f"sqlite is for one server (several servers share an etcd or mysql store)") from None
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=10000")
        self._create_tables()

    def _begin(self):
        self.lock.acquire()  # local file I/O only; released by _end
        try:
            cursor = self.db.cursor()
            cursor.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return cursor

    def _end(self, cursor, commit):
        try:
            cursor.execute("COMMIT" if commit else "ROLLBACK")
        finally:
            cursor.close()
            self.lock.release()

    def _transient(self, error):
        return isinstance(error, sqlite3.OperationalError)  # locked by another process, disk I/O

    def _fence_holds(self, cur, write):
        # Not a LeaseStore, so no lease to fence with: load_config refuses a cluster on sqlite.
        raise NotImplementedError(f"{type(self).__name__} does not share tasks between servers")

    def close(self):
        with self.lock:
            self.db.close()
        self.owner.close()


class MySQLMetaStore(SqlMetaStore, LeaseStore):
    """MySQL or MariaDB through pymysql; creates its database and tables when they are missing.

    pymysql connections are not thread-safe: each transaction takes an idle connection (or opens one) and gives
    it back, so no lock is held while the server is asked anything."""

    TIMEOUTS = {"connect_timeout": 5, "read_timeout": 10, "write_timeout": 10}

    @classmethod
    def from_settings(cls, settings: MetaStoreSettings) -> "MySQLMetaStore":
        return cls(settings.mysql, settings.root_path)

    def __init__(self, params: dict, root_path: str):
        import pymysql
        super().__init__(root_path)
        params = dict(params)
        database = params.pop("database")
        bootstrap = pymysql.connect(**params, **self.TIMEOUTS)
        try:
            with bootstrap.cursor() as cur:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{database.replace('`', '``')}`")
        finally:
            bootstrap.close()
        # FOUND_ROWS: an UPDATE counts the rows it matched, which is what taking a lease asks
        self.connect = lambda: pymysql.connect(**params, database=database, autocommit=False, **self.TIMEOUTS,
                                               client_flag=pymysql.constants.CLIENT.FOUND_ROWS)
        self.idle: queue.LifoQueue = queue.LifoQueue()
        self._create_tables()

    def _begin(self):
        try:
            connection = self.idle.get_nowait()
        except queue.Empty:
            connection = self.connect()
        return connection.cursor()

    def _end(self, cursor, commit):
        connection = cursor.connection
        try:
            connection.commit() if commit else connection.rollback()
        except Exception:
            connection.close()  # broken (the server restarted or dropped it): the next transaction opens another
            if commit:
                raise
            return
        finally:
            cursor.close()
        self.idle.put(connection)

    def _transient(self, error):
        import pymysql
        return isinstance(error, (pymysql.err.OperationalError, pymysql.err.InterfaceError))

    # Presence and ownership are rows with an expiry in the database's own clock, in UTC (NOW() follows the
    # session's time zone, which differs between servers and jumps at DST), renewed by heartbeat;
    # a target is taken with a conditional update, and a checkpoint is written only under a lock on its row.

    def _create_cluster_tables(self) -> None:
        with self._transaction() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS cdc_server (root_path {self.KEY} NOT NULL, server_id {self.KEY} "
                        f"NOT NULL, token {self.KEY} NOT NULL, expires_at DATETIME(6) NOT NULL, "
                        f"PRIMARY KEY (root_path, server_id))")
            cur.execute(f"CREATE TABLE IF NOT EXISTS cdc_owner (root_path {self.KEY} NOT NULL, target {self.KEY} "
                        f"NOT NULL, token {self.KEY} NOT NULL, expires_at DATETIME(6) NOT NULL, "
                        f"PRIMARY KEY (root_path, target))")

    def _fence_holds(self, cur, write):
        lease, target = write.fence
        cur.execute("SELECT 1 FROM cdc_owner WHERE root_path = %s AND target = %s AND token = %s AND "
                    "expires_at > UTC_TIMESTAMP(6) FOR UPDATE", (self.root_path, target, lease.token))
        held = cur.fetchone() is not None
        cur.execute("SELECT 1 FROM task_info WHERE root_path = %s AND task_id = %s FOR UPDATE",
                    (self.root_path, write.task_id))
        return held and cur.fetchone() is not None

    def join(self, server_id, ttl):
        def enter():
            self._create_cluster_tables()
            with self._transaction() as cur:
                cur.execute("REPLACE INTO cdc_server VALUES (%s, %s, %s, UTC_TIMESTAMP(6) + INTERVAL %s "
                            "MICROSECOND)", (self.root_path, server_id, token, int(ttl * 1e6)))
        token = f"{server_id}/{uuid.uuid4().hex[:12]}"
        started = time.monotonic()
        self._guard("joining the cluster", enter)
        return Lease(server_id, token, ttl, started)

    def renew(self, lease, targets=()):
        held = sorted(targets)

        def heartbeat():
            with self._transaction() as cur:
                cur.execute("UPDATE cdc_server SET expires_at = UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND WHERE "
                            "root_path = %s AND server_id = %s AND token = %s AND expires_at > UTC_TIMESTAMP(6)",
                            (int(lease.ttl * 1e6), self.root_path, lease.server_id, lease.token))
                if cur.rowcount != 1:
                    return False
                cur.execute("UPDATE cdc_owner SET expires_at = UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND WHERE "
                            "root_path = %s AND token = %s AND expires_at > UTC_TIMESTAMP(6)",
                            (int(lease.ttl * 1e6), self.root_path, lease.token))
                if not held:
                    return True
                # Each row has its own expiry: one that ran out (or was taken over) is not renewed with the server
                # row, and the local fence must not be extended over it.
                cur.execute(f"SELECT COUNT(*) FROM cdc_owner WHERE root_path = %s AND token = %s AND "
                            f"expires_at > UTC_TIMESTAMP(6) AND target IN ({', '.join(['%s'] * len(held))})",
                            (self.root_path, lease.token, *held))
                return cur.fetchone()[0] == len(held)
        started = time.monotonic()
        if not self._guard("renewing the lease", heartbeat):
            return False
        lease.renewed_at = started
        return True

    def servers(self):
        def read():
            with self._transaction() as cur:
                cur.execute("SELECT server_id, token FROM cdc_server WHERE root_path = %s AND "
                            "expires_at > UTC_TIMESTAMP(6)", (self.root_path,))
                return dict(cur.fetchall())
        return self._guard("listing servers", read)

    def acquire(self, lease, target):
        def take():
            with self._transaction() as cur:
                cur.execute("INSERT IGNORE INTO cdc_owner VALUES (%s, %s, '', UTC_TIMESTAMP(6))",
                            (self.root_path, target))
                cur.execute("UPDATE cdc_owner SET token = %s, expires_at = UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND "
                            "WHERE root_path = %s AND target = %s AND (token = %s OR expires_at <= UTC_TIMESTAMP(6))",
                            (lease.token, int(lease.ttl * 1e6), self.root_path, target, lease.token))
                return cur.rowcount == 1
        return self._guard("taking a target", take)

    def release(self, lease, target):
        def give():
            with self._transaction() as cur:
                cur.execute("UPDATE cdc_owner SET token = '', expires_at = UTC_TIMESTAMP(6) WHERE root_path = %s AND "
                            "target = %s AND token = %s", (self.root_path, target, lease.token))
        self._guard("handing over a target", give)

    def owners(self):
        def read():
            with self._transaction() as cur:
                cur.execute("SELECT target, token FROM cdc_owner WHERE root_path = %s AND "
                            "expires_at > UTC_TIMESTAMP(6) AND token <> ''", (self.root_path,))
                return {target: Lease.server_of(token) for target, token in cur.fetchall()}
        return self._guard("listing owners", read)

    def leave(self, lease):
        def out():
            with self._transaction() as cur:
                cur.execute("UPDATE cdc_owner SET token = '', expires_at = UTC_TIMESTAMP(6) WHERE root_path = %s "
                            "AND token = %s", (self.root_path, lease.token))
                cur.execute("DELETE FROM cdc_server WHERE root_path = %s AND token = %s", (self.root_path, lease.token))
        self._guard("leaving the cluster", out)

    def close(self):
        while True:
            try:
                self.idle.get_nowait().close()
            except queue.Empty:
                return


class EtcdMetaStore(MetaStore, LeaseStore):
    """Keys under ``{rootPath}/task_info/`` and ``{rootPath}/task_position/`` of an etcd cluster."""

    @classmethod
    def from_settings(cls, settings: MetaStoreSettings) -> "EtcdMetaStore":
        if settings.etcd is None:
            raise ConfigError("config: metaStoreConfig.etcd is required when storeType is etcd")
        return cls(settings.etcd, settings.root_path)

    def __init__(self, settings: EtcdSettings, root_path: str):
        super().__init__(root_path)
        self.client = settings.client(timeout=5.0)
        self.client.status()  # fail at start-up, not at the first request

    def _key(self, kind: str, task_id: str = "") -> str:
        return f"{self.root_path}/{kind}/{task_id}"

    def _load_tasks(self):
        prefix = self._key("task_info")
        return {meta.key.decode()[len(prefix):]: value.decode() for value, meta in self.client.get_prefix(prefix)}

    def _load_task(self, task_id):
        value, _ = self.client.get(self._key("task_info", task_id))
        return value.decode() if value is not None else None

    def _insert_task(self, task_id, document):
        ops, key = self.client.transactions, self._key("task_info", task_id)
        succeeded, _ = self.client.transaction(compare=[ops.version(key) == 0], success=[ops.put(key, document)],
                                               failure=[])
        return succeeded

    def _replace_task(self, task_id, before, after):
        ops, key = self.client.transactions, self._key("task_info", task_id)
        succeeded, _ = self.client.transaction(compare=[ops.value(key) == before], success=[ops.put(key, after)],
                                               failure=[])
        return succeeded

    def _delete_task(self, task_id, before):
        ops, key = self.client.transactions, self._key("task_info", task_id)
        succeeded, _ = self.client.transaction(
            compare=[ops.version(key) == 0 if before is None else ops.value(key) == before],
            success=[ops.delete(key), ops.delete(self._key("task_position", task_id))], failure=[])
        return succeeded

    def _save_positions(self, writes):
        ops = self.client.transactions
        compare = [check for write in writes if write.fence is not None for check in (
            ops.value(self._key("owner", write.fence[1])) == write.fence[0].token,
            ops.version(self._key("task_info", write.task_id)) > 0)]
        succeeded, _ = self.client.transaction(compare=compare, success=[
            ops.put(self._key("task_position", w.task_id), w.document) for w in writes], failure=[])
        if succeeded or len(writes) == 1:
            return [succeeded] * len(writes)
        return [self._save_positions([write])[0] for write in writes]  # which fence failed: each alone (rare)

    def _load_positions(self, task_id):
        value, _ = self.client.get(self._key("task_position", task_id))
        return value.decode() if value else None

    def _transient(self, error):
        return etcd_fault(error)

    # Presence and ownership keys are bound to the server's etcd lease: when it expires, etcd deletes them.

    def join(self, server_id, ttl):
        started = time.monotonic()
        granted = self._guard("joining the cluster", lambda: self.client.lease(int(max(2, round(ttl)))))
        lease = Lease(server_id, f"{server_id}/{uuid.uuid4().hex[:12]}", ttl, started, granted.id)
        self._guard("joining the cluster", lambda: self.client.put(self._key("servers", server_id), lease.token,
                                                                   lease=granted.id))
        return lease

    def renew(self, lease, targets=()):
        # the owner keys are bound to the lease and only their holder deletes them: alive while it is
        started = time.monotonic()
        answers = self._guard("renewing the lease", lambda: list(self.client.refresh_lease(lease.store_id)))
        if not answers or answers[-1].TTL <= 0:
            return False
        lease.renewed_at = started
        return True

    def servers(self):
        prefix = self._key("servers")
        return {meta.key.decode()[len(prefix):]: value.decode()
                for value, meta in self._guard("listing servers", lambda: list(self.client.get_prefix(prefix)))}

    def acquire(self, lease, target):
        ops, key = self.client.transactions, self._key("owner", target)
        succeeded, answers = self._guard("taking a target", lambda: self.client.transaction(
            compare=[ops.version(key) == 0], success=[ops.put(key, lease.token, lease=lease.store_id)],
            failure=[ops.get(key)]))
        if succeeded:
            return True
        held = answers[0][0][0] if answers and answers[0] else None
        return held is not None and held.decode() == lease.token

    def release(self, lease, target):
        ops, key = self.client.transactions, self._key("owner", target)
        self._guard("handing over a target", lambda: self.client.transaction(
            compare=[ops.value(key) == lease.token], success=[ops.delete(key)], failure=[]))

    def owners(self):
        prefix = self._key("owner")
        return {meta.key.decode()[len(prefix):]: Lease.server_of(value.decode())
                for value, meta in self._guard("listing owners", lambda: list(self.client.get_prefix(prefix)))}

    def leave(self, lease):
        self._guard("leaving the cluster", lambda: self.client.revoke_lease(lease.store_id))

    def close(self):
        self.client.close()


# The one table binding each store type to its store, as bottle's server_names does servers: open_meta_store
# chooses here, and load_config asks it which types can hold a cluster (their stores are LeaseStores).
META_STORES: dict[StoreType, type[MetaStore]] = {
    StoreType.SQLITE: SqliteMetaStore,
    StoreType.MYSQL: MySQLMetaStore,
    StoreType.ETCD: EtcdMetaStore,
}


def open_meta_store(settings: MetaStoreSettings) -> MetaStore:
    """The store of ``settings.store_type``; ConfigError for a type with no store (load_config refuses it
    first: this is for settings made in code)."""
    store_class = META_STORES.get(settings.store_type)
    if store_class is None:
        raise ConfigError(f"config: metaStoreConfig.storeType must be one of {', '.join(META_STORES)}, "
                          f"got {settings.store_type!r}")
    return store_class.from_settings(settings)


###############################################################################
# Source metadata (etcd) #######################################################
###############################################################################

@functools.cache
def etcd_messages() -> dict[str, Any]:  # message classes made at run time: mypy cannot see their fields
    """Protobuf classes the CDC declares itself: the few Milvus-internal etcd values it reads (not shipped by
    pymilvus), and a projection of data messages. Made on first use, not when the module is imported.

    Only the fields used are declared; protobuf skips the others. Enums are read as int32 (same wire format).
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from pymilvus.grpc_gen import common_pb2, msg_pb2, schema_pb2  # noqa: F401 - registers common, schema

    f = descriptor_pb2.FieldDescriptorProto
    kinds = {"int64": f.TYPE_INT64, "uint64": f.TYPE_UINT64, "int32": f.TYPE_INT32, "string": f.TYPE_STRING,
             "bool": f.TYPE_BOOL}
    messages = {
        "CollectionInfo": [("ID", 1, "int64"), ("schema", 2, ".milvus.proto.schema.CollectionSchema"),
                           ("create_time", 3, "uint64"), ("virtual_channel_names", 7, "*string"),
                           ("physical_channel_names", 8, "*string"), ("shards_num", 10, "int32"),
                           ("start_positions", 11, "*.milvus.proto.common.KeyDataPair"),
                           ("consistency_level", 12, "int32"), ("state", 13, "int32"),
                           ("properties", 14, "*.milvus.proto.common.KeyValuePair"), ("db_id", 15, "int64")],
        "PartitionInfo": [("partitionID", 1, "int64"), ("partitionName", 2, "string"),
                          ("partition_created_timestamp", 3, "uint64"), ("collection_id", 4, "int64"),
                          ("state", 5, "int32")],
        "DatabaseInfo": [("tenant_id", 1, "string"), ("name", 2, "string"), ("id", 3, "int64"),
                         ("state", 4, "int32"), ("created_time", 5, "uint64")],
        "CollectionLoadInfo": [("collectionID", 1, "int64"), ("replica_number", 3, "int32"),
                               ("status", 4, "int32"), ("load_type", 6, "int32")],
        "PartitionLoadInfo": [("collectionID", 1, "int64"), ("partitionID", 2, "int64"), ("status", 4, "int32")],
        "IndexInfo": [("collectionID", 1, "int64"), ("fieldID", 2, "int64"), ("index_name", 3, "string"),
                      ("indexID", 4, "int64"), ("index_params", 6, "*.milvus.proto.common.KeyValuePair"),
                      ("user_index_params", 12, "*.milvus.proto.common.KeyValuePair")],
        "FieldIndex": [("index_info", 1, ".milvus_cdc.etcd.IndexInfo"), ("deleted", 2, "bool"),
                       ("create_time", 3, "uint64")],
        # Only the row times of an Insert or Delete (same field in both): an upsert's Insert half has no time of
        # its own, and reading just this field costs nothing next to a full parse.
        "RowTimes": [("timestamps", msg_pb2.InsertRequest.DESCRIPTOR.fields_by_name["timestamps"].number,
                      "*uint64")],
    }
    pool = descriptor_pool.Default()
    file_name = "milvus_cdc_etcd_meta.proto"
    try:
        pool.FindFileByName(file_name)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto(name=file_name, package="milvus_cdc.etcd", syntax="proto3",
                                                   dependency=["common.proto", "schema.proto"])
        for name, fields in messages.items():
            message = proto.message_type.add(name=name)
            for field_name, number, kind in fields:
                repeated = kind.startswith("*")
                kind = kind.lstrip("*")
                decl = message.field.add(name=field_name, number=number,
                                         label=f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL)
                if kind.startswith("."):
                    decl.type, decl.type_name = f.TYPE_MESSAGE, kind
                else:
                    decl.type = kinds[kind]
        pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"milvus_cdc.etcd.{name}"))
            for name in messages}


COLLECTION_CREATED, COLLECTION_CREATING, COLLECTION_DROPPING, COLLECTION_DROPPED = 0, 1, 2, 3
PARTITION_CREATED = 0
LOAD_TYPE_PARTITION, LOAD_TYPE_COLLECTION = 1, 2
DEFAULT_DB = "default"
UNKNOWN_DB = "#"  # the name of a database dropped before it was seen, followed by its id
# A dropped key of Milvus's etcd is overwritten with this marker before garbage collection removes it.
ETCD_TOMBSTONE = b"\xE2\x9B\xBC"


@dataclass
class SourceCollection:
    """A collection as the source's root coordinator stores it in etcd."""
    id: int
    name: str
    db_id: int
    db_name: str
    schema: Any  # schema_pb2.CollectionSchema with the user's fields (system fields removed)
    shards_num: int
    consistency_level: int
    properties: list[tuple[str, str]]
    vchannels: list[str]
    pchannels: list[str]
    start_positions: dict[str, bytes]
    create_time: int
    state: int

    @property
    def dropped(self) -> bool:
        return self.state in (COLLECTION_DROPPING, COLLECTION_DROPPED)

    @property
    def qualified_name(self) -> str:
        return f"{self.db_name}.{self.name}"

    def has_partition_key(self) -> bool:
        return any(f.is_partition_key for f in self.schema.fields)


@dataclass(frozen=True)
class SourcePartition:
    id: int
    name: str
    collection_id: int
    created_ts: int
    state: int


def shard_index(vchannel: str) -> int:
    """The shard number in a vchannel name ``{pchannel}_{collectionID}v{shard}``."""
    return int(vchannel.rsplit("v", 1)[1])


VCHANNEL_PATTERN = re.compile(r"(?P<pchannel>.+)_(?P<collection>\d+)v(?P<shard>\d+)")


def pchannel_of(channel: str) -> str:
    """The pchannel of a vchannel name (``{pchannel}_{collectionID}v{shard}``); a pchannel name as it is."""
    match = VCHANNEL_PATTERN.fullmatch(channel)
    return match.group("pchannel") if match else channel


@dataclass(frozen=True)
class SourceIndex:
    field_name: str
    index_name: str
    params: tuple[tuple[str, str], ...]  # the user's index parameters
    create_time: int


def index_made_at(indexes: list[SourceIndex], field_name: str, ts: int) -> str:
    """The name of the index the source made on a field by a request at ``ts``: the one created closest to that
    time (a request replayed late must not take the name of an index made on the field since)."""
    made = [i for i in indexes if i.field_name == field_name]
    return min(made, key=lambda i: abs(i.create_time - ts)).index_name if made else field_name


@dataclass(frozen=True)
class SourceLoad:
    """How the source has a collection loaded."""
    load_type: int                 # LOAD_TYPE_PARTITION or LOAD_TYPE_COLLECTION
    replicas: int
    partition_ids: frozenset[int]  # the partitions loaded
class SourceMeta:
    """Reads databases, collections, partitions, indexes and load state from the source's etcd."""

    COLLECTION_PREFIXES = ("root-coord/database/collection-info/", "root-coord/collection/")
    LOAD_PREFIXES = ("querycoord-collection-loadinfo/", "querycoord-partition-loadinfo/")

    def __init__(self, settings: SourceSettings, patience: Patience | None = None):
        self.settings, self.patience = settings, patience
        self.prefix = f"{settings.root_path}/{settings.meta_sub_path}/"
        self.client = settings.etcd.client()
        self.lock = threading.Lock()
        self.db_names: dict[int, str] = {}
        # (a source time in Unix seconds, time.monotonic() when it was first read): the source's clock had passed
        # it then (0 until read)
        self.source_time: tuple[float, float] = (0.0, 0.0)

    def close(self) -> None:
        self.client.close()

    def _etcd(self, what: str, read: Callable[[], Any]) -> Any:
        """One read, its transient failures waited out (etcd restarting, a network cut)."""
        if self.patience is None:
            return read()
        return self.patience.run(f"reading the source etcd ({what})", read, etcd_fault)

    def _entries(self, sub: str, **kwargs) -> list[tuple[str, bytes]]:
        return self._etcd(sub, lambda: [(meta.key.decode(), value) for value, meta in
                                        self.client.get_prefix(self.prefix + sub, **kwargs)
                                        if value and value != ETCD_TOMBSTONE])

    # The source's TSO saves the upper end of the window it allocates from, its clock plus 3 s, at
    # {rootPath}/{kvSubPath}/gid/timestamp (big-endian Unix nanoseconds), before it allocates past it: so that
    # value less 3 s is a time the source's clock had passed when it was read.
    TSO_KEY, TSO_WINDOW = "kv/gid/timestamp", 3.0

    def revision(self) -> int:
        """The etcd revision now; reads the source's TSO window (``source_time``) on the way."""
        response = self._etcd("revision", lambda: self.client.get_response(
            f"{self.settings.root_path}/{self.TSO_KEY}"))
        if response.kvs and len(response.kvs[0].value) == 8:
            passed = struct.unpack(">Q", response.kvs[0].value)[0] / 1e9 - self.TSO_WINDOW
            if passed > self.source_time[0]:
                self.source_time = (passed, time.monotonic())
        return response.header.revision

    def databases(self, revision: int | None = None) -> dict[int, str]:
        """The live databases by id."""
        names = {1: DEFAULT_DB}
        for _, value in self._entries("root-coord/database/db-info/", revision=revision):
            info = etcd_messages()["DatabaseInfo"].FromString(value)
            if info.state in (0, 1, 2):  # unknown, created, creating
                names[info.id] = info.name
        with self.lock:
            self.db_names.update(names)
        return names

    def database_name(self, db_id: int) -> str:
        """A database's name, also once it is dropped (its key is gone then): the dropped collections of a
        database are still named by it. One dropped before this process saw it gets a name no database has."""
        with self.lock:
            known = self.db_names.get(db_id)
        if known is None:
            known = self.databases().get(db_id, f"{UNKNOWN_DB}{db_id}")
        return known

    def collections(self, revision: int | None = None, since: int = 0) -> list[SourceCollection]:
        """Every collection (dropped ones too, until etcd forgets them), or those changed after ``since``."""
        self.databases(revision)
        kwargs = {"revision": revision, "min_mod_revision": since + 1 if since else None}
        return [self._collection(etcd_messages()["CollectionInfo"].FromString(value))
                for prefix in self.COLLECTION_PREFIXES for _, value in self._entries(prefix, **kwargs)]

    def collection(self, collection_id: int) -> SourceCollection | None:
        for prefix in self.COLLECTION_PREFIXES:
            for _, value in self._entries(prefix):
                info = etcd_messages()["CollectionInfo"].FromString(value)
                if info.ID == collection_id:
                    return self._collection(info)
        return None

    def live_pchannels(self, excluding: int = 0) -> set[str]:
        """The pchannels of every collection not dropped (read from the collection infos alone)."""
        channels: set[str] = set()
        for prefix in self.COLLECTION_PREFIXES:
            for _, value in self._entries(prefix):
                info = etcd_messages()["CollectionInfo"].FromString(value)
                if info.ID != excluding and info.state not in (COLLECTION_DROPPING, COLLECTION_DROPPED):
                    channels.update(info.physical_channel_names)
        return channels

    def _collection(self, info) -> SourceCollection:
        from pymilvus.grpc_gen import schema_pb2
        schema = schema_pb2.CollectionSchema()
        schema.CopyFrom(info.schema)
        fields = [schema_pb2.FieldSchema.FromString(v) for _, v in self._entries(f"root-coord/fields/{info.ID}/")]
        if not fields:
            fields = list(info.schema.fields)  # collections from before fields had their own keys
        del schema.fields[:]
        schema.fields.extend(sorted((f for f in fields if f.fieldID >= 100), key=lambda f: f.fieldID))
        db_id = info.db_id or 1
        return SourceCollection(
            id=info.ID, name=info.schema.name, db_id=db_id, db_name=self.database_name(db_id),
            schema=schema, shards_num=info.shards_num or len(info.virtual_channel_names),
            consistency_level=info.consistency_level,
            properties=[(p.key, p.value) for p in info.properties],
            vchannels=list(info.virtual_channel_names), pchannels=list(info.physical_channel_names),
            start_positions={p.key: p.data for p in info.start_positions},
            create_time=info.create_time, state=info.state)

    def partitions(self, collection_id: int | None = None, revision: int | None = None,
                   since: int = 0) -> list[SourcePartition]:
        """The partitions of one collection, or of every collection changed after ``since``."""
        found = []
        sub = f"root-coord/partitions/{collection_id}/" if collection_id is not None else "root-coord/partitions/"
        for key, value in self._entries(sub, revision=revision, min_mod_revision=since + 1 if since else None):
            info = etcd_messages()["PartitionInfo"].FromString(value)
            owner = info.collection_id or int(key.rstrip("/").rsplit("/", 2)[-2])
            found.append(SourcePartition(info.partitionID, info.partitionName, owner,
                                         info.partition_created_timestamp, info.state))
        return found

    def indexes(self, collection: SourceCollection, dropped: bool = False) -> list[SourceIndex]:
        """The live indexes of a collection (and the dropped ones etcd still holds, with ``dropped``), oldest
        first."""
        fields = {f.fieldID: f.name for f in collection.schema.fields}
        found = []
        for _, value in self._entries(f"field-index/{collection.id}/"):
            index = etcd_messages()["FieldIndex"].FromString(value)
            info = index.index_info
            if (index.deleted and not dropped) or info.fieldID not in fields:
                continue
            params = info.user_index_params or info.index_params
            found.append(SourceIndex(fields[info.fieldID], info.index_name,
                                     tuple((p.key, p.value) for p in params), index.create_time))
        return sorted(found, key=lambda i: i.create_time)

    def load_state(self, collection_id: int) -> SourceLoad | None:
        """How the source has a collection loaded, None when it is not loaded."""
        value, _ = self._etcd("load state", lambda: self.client.get(
            f"{self.prefix}querycoord-collection-loadinfo/{collection_id}"))
        if not value or value == ETCD_TOMBSTONE:
            return None
        info = etcd_messages()["CollectionLoadInfo"].FromString(value)
        partitions = frozenset(etcd_messages()["PartitionLoadInfo"].FromString(v).partitionID
                               for _, v in self._entries(f"querycoord-partition-loadinfo/{collection_id}/"))
        return SourceLoad(info.load_type, max(1, info.replica_number), partitions)

    def load_keys(self, revision: int | None = None) -> dict[str, bytes]:
        """Every load-state key and value: small (one per loaded collection and partition)."""
        return {key: value for prefix in self.LOAD_PREFIXES for key, value in self._entries(prefix, revision=revision)}


class CatalogChangeKind(enum.Enum):
    COLLECTION = "collection"  # created, or its info changed
    PARTITION = "partition"    # created
    LOAD = "load"              # the load state of a collection changed (no source time: Milvus 2.3 keeps none)
    DROPPED = "dropped"        # dropped while the task was stopped (seen at its start)


@dataclass(frozen=True)
class CatalogChange:
    kind: CatalogChangeKind
    collection_id: int
    ts: int = 0                                # the source time of a creation
    collection: SourceCollection | None = None
    partition: SourcePartition | None = None


class CatalogPoller:
    """What changed in the source's catalog since the last poll, each poll read at one etcd revision.

    Polled rather than watched: a poll that starts after a source time tick T was read sees every catalog write
    made before T was issued, which is the promise the ordering needs (a watch cannot say that it is caught up).
    Collection and partition infos are read by modification revision; load-state keys, which Milvus deletes on
    release, are compared with the previous poll's.
    """

    def __init__(self, meta: SourceMeta, revision: int):
        self.meta, self.revision = meta, revision
        self.load_keys = meta.load_keys(revision)

    def poll(self) -> list[CatalogChange]:
        revision = self.meta.revision()
        if revision == self.revision:
            return []
        return self._changes(self.meta.collections(revision, since=self.revision),
                             self.meta.partitions(revision=revision, since=self.revision),
                             revision, self.meta.load_keys(revision))

    def take(self, latest: "CatalogPoll", feed: "CatalogFeed") -> list[CatalogChange]:
        """The changes up to a poll of the server's feed: from the feed's polls since this task's last, or read
        alone when the feed no longer (or not yet) has them."""
        if latest.revision <= self.revision:
            return []
        polls = feed.between(self.revision, latest.revision)
        if polls is None:
            collections = self.meta.collections(latest.revision, since=self.revision)
            partitions = self.meta.partitions(revision=latest.revision, since=self.revision)
        else:  # each as the last poll read it, as one read over the whole span would
            collections = list({c.id: c for poll in polls for c in poll.collections}.values())
            partitions = list({(p.collection_id, p.id): p for poll in polls for p in poll.partitions}.values())
        return self._changes(collections, partitions, latest.revision, latest.load_keys)

    def _changes(self, collections: list[SourceCollection], partitions: list[SourcePartition], revision: int,
                 load_keys: dict[str, bytes]) -> list[CatalogChange]:
        changes = [CatalogChange(CatalogChangeKind.COLLECTION, c.id, c.create_time, collection=c)
                   for c in collections]
        changes += [CatalogChange(CatalogChangeKind.PARTITION, p.collection_id, p.created_ts, partition=p)
                    for p in partitions]
        touched = {key for key in load_keys.keys() | self.load_keys.keys()
                   if load_keys.get(key) != self.load_keys.get(key)}
        changes += [CatalogChange(CatalogChangeKind.LOAD, collection_id)
                    for collection_id in sorted({load_key_collection(key) for key in touched})]
        self.revision, self.load_keys = revision, load_keys
        return changes


@dataclass(frozen=True)
class CatalogPoll:
    """One poll of the source's catalog, shared by the tasks of a server."""
    started_at: float   # time.monotonic(): the poll sees every catalog write made before this
    since: int          # the revision of the poll before (its own for the first)
    revision: int
    collections: list[SourceCollection]   # changed in (since, revision], as read at revision
    partitions: list[SourcePartition]
    load_keys: dict[str, bytes]            # every load-state key at revision
    source_time: tuple[float, float]       # SourceMeta.source_time as this poll read it


class CatalogFeed:
    """The source's catalog polled once for all the tasks of a server.

    Each task polling on its own cost a scan of the catalog per task and per time tick: a server with maxTaskNum
    tasks kept the source's etcd and itself busy with nothing but that. A task asks for a poll that started after
    a moment (after it read a tick: the ordering's promise); the feed makes one poll for everyone who asked
    meanwhile, and keeps the recent ones, so that each task takes the changes since the last poll it saw."""

    KEEP = 600  # polls kept (a few minutes of them): a task further behind reads its own way back

    def __init__(self, settings: SourceSettings, retry: RetryPolicy,
                 open_meta: Callable[[SourceSettings], SourceMeta] = SourceMeta):
        self.settings, self.retry, self.open_meta = settings, retry, open_meta
        self.changed = threading.Condition()
        self.polls: collections.deque[CatalogPoll] = collections.deque(maxlen=self.KEEP)
        self.asked = 0.0            # polls must go on while a task asks for one started after this
        self.started = -1.0         # when the last poll started
        self.error = ""             # why the last poll failed ("" once one succeeds)
        self.closing = False
        self.thread: threading.Thread | None = None

    def poll_after(self, moment: float, timeout: float) -> CatalogPoll | None:
        """The latest poll, once one that started after ``moment`` has ended; None after ``timeout``."""
        def done() -> bool:
            return bool(self.polls) and self.polls[-1].started_at > moment
        with self.changed:
            if self.thread is None and not self.closing:
                self.thread = threading.Thread(target=self._run, name="cdc-catalog-feed", daemon=True)
                self.thread.start()
            self.asked = max(self.asked, moment)
            self.changed.notify_all()
            return self.polls[-1] if self.changed.wait_for(done, timeout) else None

    def between(self, since: int, upto: int) -> list[CatalogPoll] | None:
        """The polls that read (since, upto], or None when they are not all kept."""
        with self.changed:
            polls = list(self.polls)
        start = next((i for i, poll in enumerate(polls) if poll.revision == since), None)
        if start is None:
            return None
        chain = [poll for poll in polls[start + 1:] if poll.revision <= upto]
        return chain if (chain[-1].revision if chain else since) == upto else None

    def close(self) -> None:
        with self.changed:
            self.closing = True
            self.changed.notify_all()
            thread = self.thread
        if thread is not None:
            thread.join(10)

    def _run(self) -> None:
        meta = self.open_meta(self.settings)
        last: CatalogPoll | None = None
        failures = 0
        try:
            while True:
                with self.changed:
                    self.changed.wait_for(lambda: self.closing or self.asked >= self.started)
                    if self.closing:
                        return
                    self.started = started = time.monotonic()
                try:
                    last = self._poll(meta, last, started)
                except Exception as exc:  # noqa: BLE001 - the tasks waiting show it, and give up in time
                    failures += 1
                    with self.changed:
                        self.error, self.started = describe_error(exc), -1.0
                    log.warning("catalog: reading the source etcd failed (try %d): %s", failures, self.error)
                    with self.changed:
                        self.changed.wait_for(lambda: self.closing, self.retry.delay(failures))
                    continue
                failures = 0
                with self.changed:
                    self.polls.append(last)
                    self.error = ""
                    self.changed.notify_all()
        finally:
            meta.close()

    @staticmethod
    def _poll(meta: SourceMeta, last: CatalogPoll | None, started: float) -> CatalogPoll:
        revision = meta.revision()
        if last is None or revision == last.revision:
            load_keys = meta.load_keys(revision) if last is None else last.load_keys
            return CatalogPoll(started, revision, revision, [], [], load_keys, meta.source_time)
        load_keys = meta.load_keys(revision)
        return CatalogPoll(started, last.revision, revision, meta.collections(revision, since=last.revision),
                           meta.partitions(revision=revision, since=last.revision),
                           last.load_keys if load_keys == last.load_keys else load_keys, meta.source_time)


def load_key_collection(key: str) -> int:
    """The collection id in ``.../querycoord-collection-loadinfo/{id}`` or ``...-partition-loadinfo/{id}/{part}``."""
    tail = key.split("-loadinfo/", 1)[1]
    return int(tail.split("/", 1)[0])


###############################################################################
# MQ readers ###################################################################
###############################################################################

@dataclass(frozen=True)
class SourceMessage:
    """One record of a source channel: its MQ id, its Milvus type and timestamp, and the raw protobuf bytes.

    The reader reads only the header (and an upsert's row times); the applier parses a message fully, once, when
    it applies it. Bytes are the compact form to buffer: a parsed message takes several times their size."""
    channel: str
    msg_id: bytes
    msg_type: int
    timestamp: int
    payload: bytes


@dataclass(frozen=True)
class ReadBatch:
    """Messages as a task's reader hands them over, with the generation under which each channel was read: a
    channel that is removed and added again is read anew, and what was read in its first life is not the
    second's."""
    generations: dict[str, int]
    messages: list[SourceMessage]


@dataclass(frozen=True)
class StartAt:
    """Where a reader starts on a channel: AFTER or AT a message id, or at the LATEST / EARLIEST end of the
    channel (then with no id)."""
    kind: StartKind
    msg_id: bytes = b""


LATEST, EARLIEST = StartAt(StartKind.LATEST), StartAt(StartKind.EARLIEST)


def decode_source_message(channel: str, msg_id: bytes, payload: bytes) -> SourceMessage:
    from pymilvus.grpc_gen import common_pb2
    base = common_pb2.MsgHeader.FromString(payload).base
    timestamp = base.timestamp
    if base.msg_type in (common_pb2.Insert, common_pb2.Delete) and not timestamp:
        # An upsert's Insert half carries its time only per row.
        timestamp = max(etcd_messages()["RowTimes"].FromString(payload).timestamps, default=0)
    return SourceMessage(channel, msg_id, base.msg_type, timestamp, payload)


class ChannelReader(ABC):
    """Reads a changing set of source channels. Used by one thread at a time (at start-up the applier's, then
    the task's reader thread)."""

    @abstractmethod
    def add(self, channel: str, start: StartAt) -> StartAt:
        """Start reading a channel; returns the start as a concrete position when the MQ can tell it."""

    @abstractmethod
    def resolve(self, channel: str, start: StartAt) -> StartAt:
        """The concrete position ``start`` stands for now, or ``start`` itself when the MQ cannot tell."""

    @abstractmethod
    def earliest(self, msg_ids: list[bytes]) -> bytes: ...

    @abstractmethod
    def remove(self, channel: str) -> None: ...

    @abstractmethod
    def read(self, timeout: float) -> list[SourceMessage]: ...

    @abstractmethod
    def at_end(self, channel: str) -> bool:
        """Has every message of the channel that exists now been returned by ``read``?"""

    @abstractmethod
    def transient(self, error: BaseException) -> bool:
        """Is this failure the MQ being unreachable or slow for now?"""

    @abstractmethod
    def close(self) -> None: ...


class KafkaChannelReader(ChannelReader):
    """kafka-python on partition 0 of each channel's topic; a message id is the offset, 8 bytes little-endian."""

    def __init__(self, settings: dict):
        from kafka import KafkaConsumer
        self.consumer = KafkaConsumer(**self.consumer_options(settings))
        self.partitions: dict[str, Any] = {}

    @staticmethod
    def consumer_options(settings: dict) -> dict[str, Any]:
        """KafkaConsumer's arguments for sourceConfig.kafka as load_config leaves it: the reader's defaults, then
        the security protocol and SASL, then the consumer map's options, which win, as librdkafka's extra
        properties do in the Go CDC. Group and commits stay off whatever the map says: the reader seeks."""
        # fetch_max_wait_ms: how long a broker may hold a fetch that finds nothing new. Kafka answers as soon as
        # something comes, but some Kafka-compatible brokers (Tansu, the tests' broker) hold it the whole wait:
        # at 500 ms the source's ticks reached the tasks 0.15 s later on average. 100 ms bounds that delay; an
        # idle server then fetches ten times a second instead of twice (the tail is one consumer per server).
        options: dict[str, Any] = {"bootstrap_servers": settings["address"].split(","), "fetch_max_bytes": 4 << 20,
                                   "max_partition_fetch_bytes": 4 << 20, "fetch_max_wait_ms": 100,
                                   "request_timeout_ms": 30000}
        sasl = settings.get("sasl") or {}
        if sasl.get("securityProtocol"):
            options["security_protocol"] = sasl["securityProtocol"]
        if sasl.get("username"):
            options.update(security_protocol=sasl.get("securityProtocol") or "SASL_PLAINTEXT",
                           sasl_mechanism=sasl.get("mechanisms") or "PLAIN",
                           sasl_plain_username=sasl["username"], sasl_plain_password=sasl.get("password", ""))
        options.update(settings.get("consumer") or {})
        options.update(group_id=None, enable_auto_commit=False)
        return options

    @staticmethod
    def offset(msg_id: bytes) -> int:
        return struct.unpack("<q", msg_id[:8].ljust(8, b"\0"))[0]

    def resolve(self, channel, start):
        from kafka import TopicPartition
        if start.kind in (StartKind.AFTER, StartKind.AT):
            return start
        partition = TopicPartition(channel, 0)
        if self.consumer.partitions_for_topic(channel) is None:
            offset = 0  # the topic does not exist yet: its first record will be offset 0
        elif start.kind == StartKind.LATEST:
            offset = self.consumer.end_offsets([partition])[partition]
        else:
            offset = self.consumer.beginning_offsets([partition])[partition]
        return StartAt(StartKind.AT, struct.pack("<q", offset))

    def earliest(self, msg_ids):
        return min(msg_ids, key=self.offset)

    def add(self, channel, start):
        from kafka import TopicPartition
        start = self.resolve(channel, start)
        partition = TopicPartition(channel, 0)
        self.partitions[channel] = partition
        self.consumer.assign(list(self.partitions.values()))
        self.consumer.seek(partition, self.offset(start.msg_id) + (start.kind == StartKind.AFTER))
        return start

    def remove(self, channel):
        if self.partitions.pop(channel, None) is not None:
            self.consumer.assign(list(self.partitions.values()))

    def read(self, timeout):
        if not self.partitions:
            time.sleep(timeout)
            return []
        batches = self.consumer.poll(timeout_ms=int(timeout * 1000), max_records=2000)
        messages = []
        for partition, records in batches.items():
            if self.partitions.get(partition.topic) != partition:
                continue
            for record in records:
                messages.append(decode_source_message(partition.topic, struct.pack("<q", record.offset),
                                                      record.value))
        return messages

    def at_end(self, channel):
        from kafka.errors import KafkaError
        partition = self.partitions.get(channel)
        if partition is None:
            return False
        try:
            end = self.consumer.end_offsets([partition])[partition]
        except KafkaError as exc:  # not known now: no promise for the channel this time (get shows the wait)
            log.warning("cannot read the end offset of %s: %s", channel, exc)
            return False
        return self.consumer.position(partition) >= end

    def caught_up(self, channel: str) -> int | None:
        """The channel's next offset when read to the end its last fetch saw (no broker round trip), else None."""
        partition = self.partitions.get(channel)
        if partition is None:
            return None
        end = self.consumer.highwater(partition)
        position = self.consumer.position(partition)
        return position if end is not None and position >= end else None

    def reading(self) -> bool:
        return bool(self.partitions)

    def transient(self, error):
        return kafka_transient(error)

    def close(self):
        self.consumer.close()


def kafka_transient(error: BaseException) -> bool:
    from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, NoBrokersAvailable
    return isinstance(error, (KafkaConnectionError, KafkaTimeoutError, NoBrokersAvailable)) or \
        isinstance(error, KafkaError) and error.retriable


class KafkaTail:
    """One Kafka consumer per server that follows, for all of its tasks, the channels they have read to the end:
    the tasks that read one channel share its fetches, and one question for its end offset. A task reads a
    channel with a consumer of its own only while it is behind (catching up, or started at a position) and hands
    the channel over once at its end (SharedKafkaReader); the tail hands it back when the task does not take what
    it is given (its inbox full), so that one slow task never holds the others, and when the broker fails it, so
    that each task waits out the fault in its own reader, shown in its `get`.

    Only the tail's thread touches its consumer; a task joins or leaves through ``joins`` and ``followers``."""

    POLL_WAIT = 0.1  # seconds a poll waits: a join is taken up at most this late

    def __init__(self, settings: dict, consumer: Callable[[], Any] | None = None):
        self.settings = settings
        self.make_consumer = consumer or self._consumer  # a seam: a test gives a consumer whose polls it times
        self.lock = threading.Condition()
        # channel -> its readers, each with whether its join is taken up: a reader is given records only from a
        # poll after the tail's consumer was sought back to where it joined, or it would miss what lies between
        self.followers: dict[str, dict["SharedKafkaReader", bool]] = {}
        self.joins: list[tuple[str, "SharedKafkaReader", int]] = []  # to seek to before the next poll
        self.closing = False
        self.thread: threading.Thread | None = None
        # end offsets: one question to the broker at a time, answering every caller that asked before it began
        self.ends: dict[str, tuple[float, int]] = {}  # channel -> (when the question began, end offset)
        self.asking: float | None = None
        self.probe: Any = None

    def join(self, reader: "SharedKafkaReader", channel: str, offset: int) -> None:
        with self.lock:
            if self.closing:
                raise TaskStopping()
            self.followers.setdefault(channel, {})[reader] = False
            self.joins.append((channel, reader, offset))
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="cdc-kafka-tail", daemon=True)
                self.thread.start()
            self.lock.notify_all()

    def leave(self, reader: "SharedKafkaReader", channel: str) -> None:
        with self.lock:
            followers = self.followers.get(channel)
            if followers is not None:
                followers.pop(reader, None)
                if not followers:
                    del self.followers[channel]

    def end_offset(self, channel: str) -> int:
        """The channel's end offset, asked of the broker after this call began."""
        since = time.monotonic()
        with self.lock:
            while True:
                known = self.ends.get(channel)
                if known is not None and known[0] >= since:
                    return known[1]
                if self.asking is None:
                    break
                self.lock.wait()
            self.asking = began = time.monotonic()
            channels = sorted(set(self.followers) | {channel})
        answers: dict[str, int] = {}
        try:
            from kafka import KafkaConsumer, TopicPartition
            if self.probe is None:
                self.probe = KafkaConsumer(**KafkaChannelReader.consumer_options(self.settings))
            ends = self.probe.end_offsets([TopicPartition(c, 0) for c in channels])
            answers = {partition.topic: offset for partition, offset in ends.items()}
            if channel not in answers:
                raise KeyError(f"the broker named no end offset for {channel}")
        finally:
            with self.lock:
                self.asking = None
                self.ends.update({c: (began, offset) for c, offset in answers.items()})
                self.lock.notify_all()
        return answers[channel]

    def close(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify_all()
            thread = self.thread
        if thread is not None:
            thread.join(10)
        if self.probe is not None:
            with contextlib.suppress(Exception):
                self.probe.close()

    def _consumer(self) -> Any:
        from kafka import KafkaConsumer
        return KafkaConsumer(**KafkaChannelReader.consumer_options(self.settings))

    def _run(self) -> None:
        from kafka import TopicPartition
        consumer = None
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.closing or self.followers, timeout=1.0)
                if self.closing:
                    break
                joins, self.joins = self.joins, []
                channels = sorted(self.followers)
            try:
                if consumer is None:
                    consumer = self.make_consumer()
                assigned = {p.topic for p in consumer.assignment()}
                if assigned != set(channels):
                    consumer.assign([TopicPartition(c, 0) for c in channels])
                seeks: dict[str, int] = {}
                for channel, _, offset in joins:
                    seeks[channel] = min(offset, seeks.get(channel, offset))
                for channel, offset in seeks.items():
                    partition = TopicPartition(channel, 0)
                    # behind the tail: read again from there (the others skip what they had)
                    if channel in channels and (channel not in assigned or consumer.position(partition) > offset):
                        consumer.seek(partition, offset)
                with self.lock:
                    for channel, reader, _ in joins:
                        if reader in self.followers.get(channel, {}):
                            self.followers[channel][reader] = True
                batches = consumer.poll(timeout_ms=int(self.POLL_WAIT * 1000), max_records=2000)
            except Exception as exc:  # noqa: BLE001 - every follower reads on by itself and shows the fault
                log.warning("the shared Kafka reader failed, its tasks read on by themselves: %s",
                            describe_error(exc))
                with contextlib.suppress(Exception):
                    consumer.close()  # type: ignore[union-attr]
                consumer = None
                self._hand_back_all()
                continue
            for partition, records in batches.items():
                messages = [decode_source_message(partition.topic, struct.pack("<q", r.offset), r.value)
                            for r in records]
                with self.lock:
                    readers = [r for r, joined in self.followers.get(partition.topic, {}).items() if joined]
                for reader in readers:
                    if not reader.deliver(partition.topic, messages):
                        self.leave(reader, partition.topic)
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close()

    def _hand_back_all(self) -> None:
        with self.lock:
            followers, self.followers, self.joins = self.followers, {}, []
        for channel, readers in followers.items():
            for reader in readers:
                reader.hand_back(channel)


class SharedKafkaReader(ChannelReader):
    """A task's ChannelReader on Kafka when the server has a KafkaTail: a consumer of its own for the channels it
    is behind on, the tail's deliveries for the others (see KafkaTail)."""

    INBOX_BYTES = 4 << 20  # what the tail may deliver ahead of the task's reads; over it, the channel comes back

    def __init__(self, settings: dict, tail: KafkaTail):
        self.settings, self.tail = settings, tail
        self.own: KafkaChannelReader | None = None
        self.lock = threading.Condition()
        # guarded by the lock (the tail delivers from its thread):
        self.shared: dict[str, int] = {}        # channel followed through the tail -> the next offset it delivers
        self.inbox: collections.deque[SourceMessage] = collections.deque()
        self.inbox_bytes = 0
        self.returned: dict[str, int] = {}      # shared channel -> the offset after the last message read returned
        self.handed_back: dict[str, int] = {}   # channel -> the offset to read on from with the task's consumer

    def _private(self) -> KafkaChannelReader:
        if self.own is None:
            self.own = KafkaChannelReader(self.settings)
        return self.own

    def resolve(self, channel, start):
        return self._private().resolve(channel, start)

    def earliest(self, msg_ids):
        return min(msg_ids, key=KafkaChannelReader.offset)

    def add(self, channel, start):
        self.remove(channel)
        return self._private().add(channel, start)

    def remove(self, channel):
        self.tail.leave(self, channel)
        with self.lock:
            self.shared.pop(channel, None)
            self.returned.pop(channel, None)
            self.handed_back.pop(channel, None)
            kept = [m for m in self.inbox if m.channel != channel]
            self.inbox = collections.deque(kept)
            self.inbox_bytes = sum(len(m.payload) for m in kept)
        if self.own is not None:
            self.own.remove(channel)

    def deliver(self, channel: str, messages: list[SourceMessage]) -> bool:
        """From the tail's thread: False when the channel is no longer taken from the tail."""
        with self.lock:
            after = self.shared.get(channel)
            if after is None:
                return False
            if self.inbox_bytes > self.INBOX_BYTES:
                del self.shared[channel]
                self.handed_back[channel] = after
                self.lock.notify_all()
                return False
            for message in messages:
                offset = KafkaChannelReader.offset(message.msg_id)
                if offset >= after:
                    self.inbox.append(message)
                    self.inbox_bytes += len(message.payload)
                    after = offset + 1
            self.shared[channel] = after
            self.lock.notify_all()
        return True

    def hand_back(self, channel: str) -> None:
        with self.lock:
            after = self.shared.pop(channel, None)
            if after is not None:
                self.handed_back[channel] = after
                self.lock.notify_all()

    def _take_back(self) -> None:
        with self.lock:
            back, self.handed_back = self.handed_back, {}
        for channel, offset in back.items():
            with self.lock:
                self.returned.pop(channel, None)
            self._private().add(channel, StartAt(StartKind.AT, struct.pack("<q", offset)))

    def _hand_over_caught_up(self) -> None:
        own = self.own
        if own is None:
            return
        for channel in list(own.partitions):
            offset = own.caught_up(channel)
            if offset is not None:
                own.remove(channel)
                with self.lock:
                    self.shared[channel] = self.returned[channel] = offset
                self.tail.join(self, channel, offset)
        if not own.reading():
            own.close()  # a consumer (and its connections) only while the task is behind
            self.own = None

    def _drain(self) -> list[SourceMessage]:
        """Under the lock."""
        taken = list(self.inbox)
        self.inbox.clear()
        self.inbox_bytes = 0
        for message in taken:
            self.returned[message.channel] = KafkaChannelReader.offset(message.msg_id) + 1
        return taken

    def read(self, timeout):
        deadline = time.monotonic() + timeout
        self._take_back()
        while True:
            with self.lock:
                messages = self._drain()
            if self.own is not None and self.own.reading():
                messages += self.own.read(0 if messages else min(0.05, max(0.0, deadline - time.monotonic())))
                self._hand_over_caught_up()
            elif not messages:
                with self.lock:
                    self.lock.wait_for(lambda: self.inbox or self.handed_back,
                                       timeout=max(0.0, deadline - time.monotonic()))
                    messages = self._drain()
            if messages or time.monotonic() >= deadline or self.handed_back:
                return messages

    def at_end(self, channel):
        if self.own is not None and channel in self.own.partitions:
            return self.own.at_end(channel)
        with self.lock:
            if channel not in self.shared:
                return False
        try:
            end = self.tail.end_offset(channel)
        except Exception as exc:  # noqa: BLE001 - not known now: no promise for the channel this time
            log.warning("cannot read the end offset of %s: %s", channel, describe_error(exc))
            return False
        with self.lock:
            return channel in self.shared and self.returned.get(channel, -1) >= end

    def transient(self, error):
        return kafka_transient(error)

    def close(self):
        with self.lock:
            channels = list(self.shared)
            self.shared.clear()
        for channel in channels:
            self.tail.leave(self, channel)
        if self.own is not None:
            self.own.close()


class PulsarChannelReader(ChannelReader):
    """pulsar-client readers on ``persistent://{tenant}/{namespace}/{channel}``; a message id is the serialized
    Pulsar MessageIdData, as Milvus stores it."""

    PREFETCH_BYTES = 256 << 20
    # pulsar-client logs each refusal as an error: on an empty topic the end is promised at most this often
    EMPTY_RECHECK = 1.0

    def __init__(self, settings: dict):
        import pulsar
        self.pulsar = pulsar
        options: dict[str, Any] = {"operation_timeout_seconds": 30, "logger": logging.getLogger("pulsar")}
        if settings.get("authPlugin"):
            options["authentication"] = pulsar.Authentication(settings["authPlugin"], settings.get("authParams", ""))
        self.client = pulsar.Client(settings["address"], **options)
        tenant, namespace = settings.get("tenant") or "public", settings.get("namespace") or "default"
        # Prefetch per channel, bounded in bytes by the largest message the source may write (maxMessageSize)
        self.receiver_queue = max(10, min(1000, self.PREFETCH_BYTES // settings.get("maxMessageSize", 5242880)))
        self.topic_prefix = f"persistent://{tenant}/{namespace}/"
        self.readers: dict[str, Any] = {}
        self.had_messages: set[str] = set()  # channels started at or after a message, or read from
        self.refused_at: dict[str, float] = {}  # when the broker last refused the last message id, by channel

    def resolve(self, channel, start):
        return start  # a Pulsar reader cannot name the latest message before it reads one

    def earliest(self, msg_ids):
        def order(msg_id: bytes):
            parsed = self.pulsar.MessageId.deserialize(msg_id)
            return parsed.ledger_id(), parsed.entry_id(), parsed.batch_index()
        return min(msg_ids, key=order)

    def add(self, channel, start):
        self.remove(channel)
        if start.kind == StartKind.LATEST:
            message_id, inclusive = self.pulsar.MessageId.latest, False
        elif start.kind == StartKind.EARLIEST:
            message_id, inclusive = self.pulsar.MessageId.earliest, True
        else:
            message_id, inclusive = self.pulsar.MessageId.deserialize(start.msg_id), start.kind == StartKind.AT
        self.readers[channel] = self.client.create_reader(self.topic_prefix + channel, message_id,
                                                          start_message_id_inclusive=inclusive,
                                                          receiver_queue_size=self.receiver_queue)
        if start.msg_id:
            self.had_messages.add(channel)
        return start

    def remove(self, channel):
        reader = self.readers.pop(channel, None)
        self.had_messages.discard(channel)
        self.refused_at.pop(channel, None)
        if reader is not None:
            reader.close()

    def read(self, timeout):
        deadline = time.monotonic() + timeout
        messages: list[SourceMessage] = []
        while not messages and time.monotonic() < deadline:
            for channel, reader in list(self.readers.items()):
                # Polling read_next costs no broker round trip; at_end asks the broker.
                while len(messages) < 2000:
                    try:
                        msg = reader.read_next(timeout_millis=5)
                    except self.pulsar.Timeout:
                        break
                    self.had_messages.add(channel)
                    messages.append(decode_source_message(channel, msg.message_id().serialize(), msg.data()))
            if not self.readers:
                time.sleep(max(0.0, deadline - time.monotonic()))
        return messages

    def at_end(self, channel):
        reader = self.readers.get(channel)
        if reader is None:
            return False
        refused = self.refused_at.get(channel)
        if refused is not None and time.monotonic() - refused < self.EMPTY_RECHECK:
            return False  # no promise this time: asking again so soon would mostly log the same refusal again
        try:
            # The broker's last message id against the last one read_next returned: a read_next timeout would
            # only say that nothing is dispatched to this consumer yet (a slow broker, a queue not yet filled).
            # Until a reader started at the latest message reads one, the client compares with the mark-delete
            # position the broker reports instead (brokers that report none look at their end then).
            return not reader.has_message_available()
        except self.pulsar.UnknownError as exc:
            # pulsar-lite refuses the last message id of a topic without messages ("Topic has no messages";
            # Apache Pulsar answers entry -1 instead). Taken for an empty topic only when the channel is not
            # known to hold a message: otherwise it is some other failure, and a promise could run ahead.
            if channel in self.had_messages:
                log.warning("cannot read the last message id of %s: %s", channel, exc)
                return False
            self.refused_at[channel] = time.monotonic()
            return True
        except self.pulsar.PulsarException as exc:  # not known now: no promise for the channel this time
            log.warning("cannot read the last message id of %s: %s", channel, exc)
            return False

    def transient(self, error):
        return isinstance(error, (self.pulsar.ConnectError, self.pulsar.Timeout, self.pulsar.ServiceUnitNotReady,
                                  self.pulsar.TooManyLookupRequestException, self.pulsar.LookupError))

    def close(self):
        for channel in list(self.readers):
            self.remove(channel)
        self.client.close()


def open_channel_reader(settings: SourceSettings, tail: KafkaTail | None = None) -> ChannelReader:
    if settings.mq_type == MqType.KAFKA:
        return SharedKafkaReader(settings.kafka, tail) if tail is not None else KafkaChannelReader(settings.kafka)
    return PulsarChannelReader(settings.pulsar)


###############################################################################
# Message rewrite ##############################################################
###############################################################################

@dataclass
class TargetCollection:
    """What the CDC needs to know of a collection on the target to address messages to it."""
    id: int
    db_name: str
    name: str
    created_ts: int
    vchannels: list[str]            # by shard index
    fields: dict[str, int]          # field name -> field id
    partitions: dict[str, int]      # partition name -> partition id

    @property
    def pchannels(self) -> list[str]:
        return [pchannel_of(v) for v in self.vchannels]

    @property
    def qualified_name(self) -> str:
        return f"{self.db_name}.{self.name}"


class MessageRewriter:
    """Turns source DML messages into the target's: its collection id, partition id (by name), vchannel and field
    ids. Timestamps, row ids, primary keys and ``base.msgID`` stay the source's: the target keeps source time,
    and drops a repeated msgID within one tick window, which is what makes a replay after a crash harmless."""

    @staticmethod
    def _address(msg, target: TargetCollection, shard: int) -> None:
        msg.collectionID = target.id
        msg.shardName = target.vchannels[shard]
        if hasattr(msg, "db_name"):
            msg.db_name = target.db_name
        if hasattr(msg, "dbID"):
            msg.dbID = 0

    @classmethod
    def insert(cls, msg, target: TargetCollection, partition_id: int, shard: int) -> bytes:
        cls._address(msg, target, shard)
        msg.partitionID = partition_id
        msg.segmentID = 0  # the target assigns its own segment
        for data in msg.fields_data:
            if data.field_name in target.fields:
                data.field_id = target.fields[data.field_name]
        return msg.SerializeToString()

    @classmethod
    def delete(cls, msg, target: TargetCollection, partition_id: int, shard: int) -> bytes:
        cls._address(msg, target, shard)
        msg.partitionID = partition_id
        return msg.SerializeToString()

    @staticmethod
    def drop_collection(target: TargetCollection, ts: int, msg_id: int) -> list[tuple[str, bytes]]:
        """The drop message for each shard of a target collection, by target pchannel: the target writes none
        of its own for a replicated drop, and its shards stop only on one."""
        from pymilvus.grpc_gen import common_pb2, msg_pb2
        message = msg_pb2.DropCollectionRequest(
            base=common_pb2.MsgBase(msg_type=common_pb2.DropCollection, timestamp=ts, msgID=msg_id),
            db_name=target.db_name, collectionName=target.name, collectionID=target.id).SerializeToString()
        return [(pchannel, message) for pchannel in target.pchannels]

    @staticmethod
    def drop_partition(target: TargetCollection, name: str, ts: int, msg_id: int) -> list[tuple[str, bytes]]:
        from pymilvus.grpc_gen import common_pb2, msg_pb2
        message = msg_pb2.DropPartitionRequest(
            base=common_pb2.MsgBase(msg_type=common_pb2.DropPartition, timestamp=ts, msgID=msg_id),
            db_name=target.db_name, collection_name=target.name, partition_name=name,
            collectionID=target.id, partitionID=target.partitions[name]).SerializeToString()
        return [(pchannel, message) for pchannel in target.pchannels]

    @staticmethod
    def time_tick(timestamp: int) -> bytes:
        from pymilvus.grpc_gen import common_pb2, msg_pb2
        return msg_pb2.TimeTickMsg(base=common_pb2.MsgBase(msg_type=common_pb2.TimeTick, timestamp=timestamp,
                                                           msgID=timestamp)).SerializeToString()


###############################################################################
# Target writer ################################################################
###############################################################################

class TargetError(Exception):
    """A call to the target failed for good; the message names the operation, the object and the target's answer."""


class TargetRefusal(TargetError):
    """The target answered and refused, saying why: the same call again cannot help, only a repair can."""

    def __init__(self, op: str, status):
        super().__init__(f"{op}: {status_text(status)}")
        self.op, self.status = op, status


class TlsFileError(Exception):
    """A dial_config file the CDC server cannot use; says which key, and never whether the file exists."""

    def __init__(self, key: str):
        super().__init__(f"milvus_connect_param.dial_config.{key}: the CDC server cannot load a PEM file from the "
                         f"path named there (missing, unreadable, or not what {key} needs)")
        self.key = key


@dataclass(frozen=True)
class ConnectParam:
    """``milvus_connect_param`` of a task: where the target is and how to reach it."""
    uri: str
    token: str = ""
    connect_timeout: float = 10.0
    dial_config: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> str:
        parsed = urllib.parse.urlsplit(self.uri)
        return f"{parsed.hostname}:{parsed.port or 19530}"

    @property
    def secure(self) -> bool:
        return urllib.parse.urlsplit(self.uri).scheme == "https" or bool(self.dial_config)

    def channel(self):
        import grpc
        options = [("grpc.max_send_message_length", 512 << 20), ("grpc.max_receive_message_length", 512 << 20),
                   ("grpc.keepalive_time_ms", 30000), *GRPC_QUICK_RECONNECT]
        if not self.secure:
            return grpc.insecure_channel(self.address, options=options)
        files = self.tls_files()
        credentials = grpc.ssl_channel_credentials(root_certificates=files.get("root"), private_key=files.get("key"),
                                                   certificate_chain=files.get("chain"))
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(self.address, credentials, options=options)

    @property
    def server_name(self) -> str:
        return dict(self.dial_config).get("server_name", "")

    def tls_files(self) -> dict[str, bytes]:
        """The PEM files of dial_config: ``root`` (server_pem_path or ca_pem_path), ``chain`` and ``key`` (the
        client's). A file that cannot be read raises TlsFileError naming the dial_config key, not the file."""
        dial, found = dict(self.dial_config), {}
        for role, keys in (("root", ("server_pem_path", "ca_pem_path")), ("chain", ("client_pem_path",)),
                           ("key", ("client_key_path",))):
            for key in keys:
                if dial.get(key):
                    try:
                        with open(dial[key], "rb") as fh:
                            found[role] = fh.read()
                    except OSError:
                        raise TlsFileError(key) from None
                    break
        return found

    def metadata(self, db_name: str = "") -> tuple:
        pairs = []
        if self.token:
            pairs.append(("authorization", base64.b64encode(self.token.encode()).decode()))
        if db_name:
            pairs.append(("dbname", db_name))
        return tuple(pairs)


def status_of(response):
    return response.status if hasattr(response, "DESCRIPTOR") and "status" in response.DESCRIPTOR.fields_by_name \
        else response


def status_ok(status) -> bool:
    return status.code == 0 and status.error_code == 0


def status_text(status) -> str:
    return f"code {status.code or status.error_code}: {status.reason or status.detail}"


def answer_says(status, *needles: str | re.Pattern) -> bool:
    text = (status.reason + " " + status.detail).lower()
    return any(n.search(text) is not None if isinstance(n, re.Pattern) else n in text for n in needles)


# "Not found" of an object a request names (a replay of a drop or release finds it gone), not of the target's own
# components ("node not found" while it settles after a restart, "index node", or after "collection:").
OBJECT_NOT_FOUND = re.compile(r"\b(?:collection|partition|database|index|field|alias)(?::\S+|\s+(?!node\b)\S+)?\s+"
                              r"(?:not found|not exist|doesn't exist|does not exist)")
NOT_FOUND: tuple[str | re.Pattern, ...] = (OBJECT_NOT_FOUND,)
ALREADY_EXISTS = ("already exist", "duplicate")


def _transient_codes() -> tuple[frozenset[int], frozenset[int]]:
    """Answers that say "not now" rather than "no": retried with backoff. Milvus 2.3 gives them either as
    ``code`` (its merr service errors: not ready 1, unavailable 2, memory 3, request limit 4, internal 5, disk 7,
    rate limit 8, force deny 9) or, from older paths, as the legacy ``error_code``."""
    from pymilvus.exceptions import ErrorCode
    from pymilvus.grpc_gen import common_pb2
    codes = frozenset({1, 2, 3, 4, 5, 7, ErrorCode.RATE_LIMIT, ErrorCode.FORCE_DENY})
    legacy = frozenset({common_pb2.RateLimit, common_pb2.ForceDeny, common_pb2.NotReadyServe,
                        common_pb2.NotReadyCoordActivating, common_pb2.MemoryQuotaExhausted,
                        common_pb2.DiskQuotaExhausted, common_pb2.TimeTickLongDelay, common_pb2.DDRequestRace})
    return codes, legacy


TRANSIENT_CODES, TRANSIENT_ERROR_CODES = _transient_codes()


def _clear_refusal_codes() -> tuple[frozenset[int], frozenset[int]]:
    """Answers that say what is wrong with the request itself. Milvus 2.3 gives an invalid parameter as merr code
    1100 (pymilvus names no constant for it) with the legacy ``error_code`` IllegalArgument beside it, so both
    fields count."""
    from pymilvus.exceptions import ErrorCode
    from pymilvus.grpc_gen import common_pb2
    codes = frozenset({ErrorCode.COLLECTION_NOT_FOUND, ErrorCode.INDEX_NOT_FOUND})
    legacy = frozenset({common_pb2.PermissionDenied, common_pb2.CollectionNotExists, common_pb2.IllegalArgument,
                        common_pb2.IllegalDimension, common_pb2.IllegalIndexType, common_pb2.IllegalCollectionName,
                        common_pb2.IllegalTOPK, common_pb2.IllegalRowRecord, common_pb2.IllegalVectorID,
                        common_pb2.IllegalSearchResult, common_pb2.IllegalNLIST, common_pb2.IllegalMetricType,
                        common_pb2.IndexNotExist, common_pb2.CollectionNameNotFound, common_pb2.SchemaMismatch,
                        common_pb2.UpsertAutoIDTrue})
    return codes, legacy


CLEAR_REFUSAL_CODES, CLEAR_REFUSAL_ERROR_CODES = _clear_refusal_codes()
# The same in words, for the many refusals Milvus 2.3 answers with code 65535 (OBJECT_NOT_FOUND: only of an
# object a request names).
CLEAR_REFUSAL_TEXT = re.compile(
    OBJECT_NOT_FOUND.pattern + r"|already exist|\bduplicate|\bconflict|\binvalid\b|\billegal\b|schema mismatch"
    r"|missing parameter|not support|unsupported|exceeded the limit|permission denied|not permitted"
    r"|not authenticated|deny to use")


def clear_refusal(status) -> bool:
    """Does the target's answer say what is wrong with the request (not found, already exists, invalid)? Only
    such a refusal is final at once; any other answer may come from a target that is still settling."""
    return status.code in CLEAR_REFUSAL_CODES or status.error_code in CLEAR_REFUSAL_ERROR_CODES or \
        CLEAR_REFUSAL_TEXT.search((status.reason + " " + status.detail).lower()) is not None



class TargetWriter:
    """Every call to the target Milvus, over pymilvus's gRPC stubs.

    Errors are classified: a transient one (unreachable, deadline, not ready, rate limit) is retried with backoff
    for up to ``retryTimeout`` and then halts the task; a refusal that says what is wrong with the request
    (``clear_refusal``), or that ``explained_if`` says the caller can repair, raises TargetRefusal at once, for
    the caller to repair or to stop on. Any other answer is retried like a transient one: a target that has just
    restarted answers code 65535 "unrecoverable error" (a node not registered yet) for a while. ``ok_if`` tells
    which refusals mean the work is already done (a replay).
    """

    def __init__(self, param: ConnectParam, patience: Patience, metrics: TaskMetrics | None = None,
                 fence: tuple[Lease, str] | None = None):
        from pymilvus.grpc_gen import milvus_pb2_grpc
        self.param, self.patience, self.metrics, self.fence = param, patience, metrics, fence
        self.grpc_channel = param.channel()
        self.stub = milvus_pb2_grpc.MilvusServiceStub(self.grpc_channel)
        self.call_timeout = max(30.0, param.connect_timeout)
        # A test seam: every try waits this long before its fence check, so that a test can stop the process
        # while calls are certainly in flight (made, not yet sent) and see that none goes out once it wakes.
        self.hold_before_call = float(os.environ.get(self.HOLD_ENV) or 0)

    HOLD_ENV = "MILVUS_CDC_TEST_HOLD_CALLS"

    def close(self) -> None:
        self.grpc_channel.close()

    def sibling(self, patience: Patience) -> "TargetWriter":
        """A writer on the same connection for another thread, with that thread's own patience."""
        twin = copy.copy(self)
        twin.patience = patience
        return twin

    def call(self, op: str, method: str, request, db_name: str = "", ok_if: Callable[[Any], bool] | None = None,
             transient_if: Callable[[Any], bool] | None = None, explained_if: Callable[[Any], bool] | None = None):
        import grpc

        def attempt():
            if self.hold_before_call:
                time.sleep(self.hold_before_call)
            if self.fence is not None and not self.fence[0].valid():
                log.info("task=%s not sent, the lease on target %s ran out: %s", self.patience.task_id,
                         self.fence[1], op)
                raise LeaseLost(f"the lease on target {self.fence[1]} ran out before {op}")
            started = time.monotonic()
            try:
                response = getattr(self.stub, method)(request, timeout=self.call_timeout,
                                                      metadata=self.param.metadata(db_name))
            except grpc.RpcError as exc:
                self._count(method, started, exc.code().name, exc.code().name in TRANSIENT_GRPC)
                if exc.code().name in TRANSIENT_GRPC:
                    raise TransientError(f"{exc.code().name}: {exc.details()}") from None
                raise TargetError(f"{op}: {exc.code().name}: {exc.details()}") from None
            status = status_of(response)
            if status_ok(status) or (ok_if is not None and ok_if(status)):
                self._count(method, started)
                return response
            transient = status.code in TRANSIENT_CODES or status.error_code in TRANSIENT_ERROR_CODES or \
                (transient_if is not None and transient_if(status))
            final = not transient and (clear_refusal(status) or (explained_if is not None and explained_if(status)))
            self._count(method, started, str(status.code or status.error_code), not final)
            if not final:
                raise TransientError(status_text(status))
            raise TargetRefusal(op, status)
        try:
            return self.patience.run(op, attempt, lambda exc: isinstance(exc, TransientError),
                                     pause=self._until_ready)
        except TaskHalt as halt:
            raise TaskHalt(f"writing to the target: {halt}") from None

    def _count(self, method: str, started: float, code: str = "", transient: bool = False) -> None:
        if self.metrics is None:
            return
        self.metrics.call_time(method, time.monotonic() - started)
        if code:
            (self.metrics.retried if transient else self.metrics.failed)(method, code)

    def _until_ready(self, seconds: float) -> None:
        """Wait out a backoff, but no longer than until the target answers again: gRPC reconnects within its own
        backoff (kept short by the channel options), and the next try goes out at once."""
        import grpc
        deadline = time.monotonic() + seconds
        while not self.patience.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            try:
                grpc.channel_ready_future(self.grpc_channel).result(timeout=min(0.5, left))
                return
            except grpc.FutureTimeoutError:
                continue

    @staticmethod
    def base(msg_type: int, timestamp: int):
        from pymilvus.grpc_gen import common_pb2
        return common_pb2.MsgBase(msg_type=msg_type, replicateInfo=common_pb2.ReplicateInfo(
            isReplicate=True, msgTimestamp=timestamp))

    def replicate(self, pchannel: str, messages: list[bytes]) -> None:
        from pymilvus.grpc_gen import milvus_pb2
        # One request per ~16 MB keeps every call far below gRPC's and the target MQ's message limits.
        chunk: list[bytes]
        chunk, size = [], 0
        for message in messages + [None]:
            if message is None or (chunk and size + len(message) > 16 << 20):
                if chunk:
                    self.call(f"replicate {len(chunk)} message(s) to {pchannel}", "ReplicateMessage",
                              milvus_pb2.ReplicateMessageRequest(channel_name=pchannel, Msgs=chunk))
                chunk, size = [], 0
            if message is not None:
                chunk.append(message)
                size += len(message)


def probe_target(param: ConnectParam, timeout: float) -> str | None:
    """One quick look at a would-be target: None when it is reachable and accepts replication, else why not,
    naming the cause (a TLS mistake is told apart from an unreachable server)."""
    import grpc
    from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc
    timeout = max(timeout, 0.5)
    try:
        problem = check_tls(param, timeout) if param.secure else None
        if problem:
            return problem
        if not param.secure and speaks_tls(param, min(timeout, 2.0)):
            return (f"the target Milvus at {param.uri} speaks TLS: use an https:// uri and a dial_config "
                    f"(server_name and server_pem_path, or ca_pem_path and a client certificate)")
        channel = param.channel()
    except TlsFileError as exc:
        return str(exc)
    try:
        stub = milvus_pb2_grpc.MilvusServiceStub(channel)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            answer = stub.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(channel_name=""), timeout=timeout,
                                           metadata=param.metadata())
        except grpc.FutureTimeoutError:
            return f"cannot reach the target Milvus at {param.uri} within {timeout:g}s"
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return f"the target Milvus at {param.uri} refused the token: {exc.details()}"
            return f"the target Milvus at {param.uri} did not answer: {exc.code().name}: {exc.details()}"
        if answer.status.code == 1900:
            return (f"the target Milvus at {param.uri} has common.ttMsgEnabled=true; set it to false in its "
                    f"milvus.yaml so it accepts replication")
        if answer.status.code == 1100 or status_ok(answer.status):
            return None  # 1100: the empty channel name was refused, after the ttMsgEnabled check passed
        if answer_says(answer.status, "auth", "credential", "permission", "privilege", "password", "user"):
            return f"the target Milvus at {param.uri} refused the token: {status_text(answer.status)}"
        return f"the target Milvus at {param.uri} refused replication: {status_text(answer.status)}"
    finally:
        channel.close()


def check_tls(param: ConnectParam, timeout: float) -> str | None:
    """A TLS handshake with the task's own files, through Python's ssl module, whose errors say what is wrong
    (gRPC only says that the channel never became ready). None when it succeeds or the target is unreachable."""
    import socket
    import ssl
    files = param.tls_files()
    context = ssl.create_default_context()
    if "root" in files:
        key = next(k for k in ("server_pem_path", "ca_pem_path") if dict(param.dial_config).get(k))
        try:
            context = ssl.create_default_context(cadata=files["root"].decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise TlsFileError(key) from None
        # gRPC trusts the server's own certificate given as the root (the one-way setup); OpenSSL only so
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    client_cert = "chain" in files or "key" in files
    if client_cert:
        dial = dict(param.dial_config)
        try:
            ssl.create_default_context(cadata=files.get("chain", b"").decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise TlsFileError("client_pem_path") from None
        try:
            context.load_cert_chain(dial["client_pem_path"], dial["client_key_path"])
        except (ssl.SSLError, OSError, KeyError):
            raise TlsFileError("client_key_path") from None
    context.set_alpn_protocols(["h2"])
    host, port = split_host_port(param.address, 19530)
    name = param.server_name or host
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=name) as tls:
            tls.settimeout(min(timeout, 1.0))
            try:  # TLS 1.3 sends a refusal of the client's certificate only after the handshake
                tls.recv(1)
            except (TimeoutError, socket.timeout):
                pass
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            return (f"the target's TLS certificate is not valid for the server name {name!r}: set "
                    f"dial_config.server_name to a name the certificate holds")
        source = "the CA in dial_config" if param.dial_config else "the system's CAs"
        return f"the target's TLS certificate does not verify against {source}: {exc.verify_message}"
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        refused = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "HANDSHAKE_FAILURE", "UNKNOWN_CA",
                   "CERTIFICATE_UNKNOWN")
        if not client_cert and any(r in reason for r in refused):
            # Milvus (Go) answers a missing client certificate with a bad-certificate alert
            return ("the target requires a client certificate (mutual TLS): set dial_config.ca_pem_path, "
                    "client_pem_path and client_key_path")
        if any(r in reason for r in refused):
            return ("the target refused the client certificate of dial_config.client_pem_path: not signed by a CA "
                    "it trusts")
        if client_cert and "EOF" in reason:  # another CA's client certificate may just end the connection
            return ("the target closed the TLS connection during the handshake: it does not seem to trust the "
                    "client certificate of dial_config.client_pem_path")
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "PACKET_LENGTH" in reason:
            return (f"the target Milvus at {param.uri} does not speak TLS: use an http:// uri and no "
                    f"dial_config")
        return f"TLS handshake with the target failed: {exc.reason or exc}"
    except OSError:
        return None  # unreachable: gRPC's own wait says so
    return None


def speaks_tls(param: ConnectParam, timeout: float) -> bool:
    """Does the server answer a TLS handshake (so a plain http:// uri is the mistake)?"""
    import socket
    import ssl
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    host, port = split_host_port(param.address, 19530)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw):
            return True
    except (OSError, ssl.SSLError):
        return False


###############################################################################
# Target mirror ################################################################
###############################################################################

class SendLane:
    """One target pchannel's messages, sent in the order given, by a thread of its own.

    Insert and delete batches (``reorderable``) may be in ``len(writers)`` calls at once: the target consumes a
    channel one tick window at a time and applies a window's inserts before its deletes, whatever their order of
    arrival, and a tick goes out only after every call below it was answered (Applier._commit_sent). Any other
    message (a drop of a collection or partition) waits until no call is out on the channel and goes alone."""

    MERGE_BYTES = 4 << 20  # what queued up meanwhile goes out in one call, up to this much

    def __init__(self, pchannel: str, writers: list[TargetWriter], task_id: str):
        self.pchannel, self.writers, self.task_id = pchannel, writers, task_id
        self.work: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: list[concurrent.futures.Future] = []   # submitted, maybe not answered (applier's only)
        self.slots = threading.Semaphore(len(writers))   # calls that may start now
        self.calls: queue.SimpleQueue = queue.SimpleQueue()  # batches for the call threads
        self.failed: BaseException | None = None            # after a failure nothing more goes out: order first
        name = f"cdc-send-{task_id[:8]}-{pchannel[-8:]}"
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        # With one writer the lane thread makes every call itself; with more, each writer has a call thread, and
        # the lane thread uses the first one only while every call thread is idle.
        self.call_threads = [threading.Thread(target=self._call_loop, args=(writer,), name=f"{name}-{i}",
                                              daemon=True) for i, writer in enumerate(writers)] \
            if len(writers) > 1 else []
        for thread in self.call_threads:
            thread.start()

    def submit(self, messages: list[bytes], reorderable: bool = False) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.work.put((messages, future, reorderable))
        self.pending = [f for f in self.pending if not f.done()] + [future]
        return future

    def drain(self) -> None:
        """Wait until everything submitted is answered: with several calls out, the last may be answered first. A
        failure is raised here."""
        for future in self.pending:
            future.result()
        self.pending = []

    def close(self) -> None:
        self.work.put(None)

    def join(self, deadline: float) -> bool:
        """Wait (until ``deadline``, monotonic) for the lane's threads, and so its calls, to end; True if they did."""
        for thread in (self.thread, *self.call_threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in (self.thread, *self.call_threads))

    def _run(self) -> None:
        closing = False
        while not closing and (item := self.work.get()) is not None:
            # The target takes a few large calls much faster than many small ones: what the applier queued
            # while the last call was out goes in the next one, in order.
            messages, futures, reorderable = list(item[0]), [item[1]], item[2]
            size = sum(len(m) for m in messages)
            while size < self.MERGE_BYTES:
                try:
                    more = self.work.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                messages += more[0]
                futures.append(more[1])
                reorderable = reorderable and more[2]
                size += sum(len(m) for m in more[0])
            if reorderable and self.call_threads:
                self.slots.acquire()
                self.calls.put((messages, futures))
            else:
                for _ in self.writers:  # every call out on the channel answered
                    self.slots.acquire()
                try:
                    self._send(self.writers[0], messages, futures)
                finally:
                    for _ in self.writers:
                        self.slots.release()
        for _ in self.call_threads:
            self.calls.put(None)

    def _call_loop(self, writer: TargetWriter) -> None:
        while (item := self.calls.get()) is not None:
            try:
                self._send(writer, *item)
            finally:
                self.slots.release()

    def _send(self, writer: TargetWriter, messages: list[bytes], futures: list[concurrent.futures.Future]) -> None:
        if self.failed is None:
            try:
                writer.replicate(self.pchannel, messages)
            except BaseException as exc:  # noqa: BLE001 - handed to the applier through the futures
                self.failed = exc
            else:
                log.debug("task=%s sent %d message(s) to %s", self.task_id, len(messages), self.pchannel)
        failed = self.failed
        for future in futures:
            future.set_exception(failed) if failed is not None else future.set_result(None)


class Outbox:
    """Rewritten messages by target pchannel. ``send`` hands them to the pchannels' lanes, which write to the
    target in parallel, each in order, while the applier goes on; ``flush`` also waits until every lane has
    written everything, before a call that must come after the data."""

    def __init__(self, writer: TargetWriter, task_id: str,
                 lane_writer: Callable[[str, int], TargetWriter] | None = None, calls_per_channel: int = 1):
        self.writer, self.task_id, self.calls_per_channel = writer, task_id, calls_per_channel
        self.lane_writer = lane_writer or (lambda pchannel, call: writer)
        self.messages: dict[str, list[bytes]] = defaultdict(list)
        self.ordered: set[str] = set()   # pchannels with a message that must not overtake nor be overtaken
        self.lanes: dict[str, SendLane] = {}
        self.size = 0  # bytes added since the last send

    def add(self, pchannel: str, message: bytes, reorderable: bool = False) -> None:
        """``reorderable``: an insert or a delete, which the target applies by its tick window, not by arrival."""
        self.messages[pchannel].append(message)
        if not reorderable:
            self.ordered.add(pchannel)
        self.size += len(message)

    def send(self) -> list[concurrent.futures.Future]:
        sent, self.size = [], 0
        for pchannel in list(self.messages):
            lane = self.lanes.get(pchannel)
            if lane is None:
                writers = [self.lane_writer(pchannel, call) for call in range(self.calls_per_channel)]
                lane = self.lanes[pchannel] = SendLane(pchannel, writers, self.task_id)
            sent.append(lane.submit(self.messages.pop(pchannel), reorderable=pchannel not in self.ordered))
        self.ordered.clear()
        return sent

    def flush(self) -> None:
        self.send()
        for lane in self.lanes.values():
            lane.drain()

    def close(self, timeout: float = 0.0) -> bool:
        """Stop the lanes, waiting up to ``timeout`` for the calls still out (what was queued behind them fails at
        once once the task stops): a call that lands after its task stopped could land after the next run of the
        task re-sent it, outside the tick window that makes a repeat harmless. True when none is out any more."""
        deadline = time.monotonic() + timeout
        for lane in self.lanes.values():
            lane.close()
        return all([lane.join(deadline) for lane in self.lanes.values()])


class Undone(Exception):
    """A repair found that the source's history undid what the refused call would do (a load whose index the
    source dropped since, which it could do only after releasing): the call is skipped, not the task halted."""


@dataclass(frozen=True)
class Repair:
    """What to do first when the target refuses a call for a state reason the source's history explains."""
    applies: Callable[[Any], bool]   # to the target's answer (its status)
    fix: Callable[[], None]
    why: str


@dataclass(frozen=True)
class WantedLoad:
    """The load state to bring a target collection to: loaded as a whole or partition by partition."""
    whole: bool
    replicas: int
    partitions: frozenset[str]  # loaded partition names (for a whole load: those not released since)
    partition_key: bool = False  # partitions managed by Milvus: only whole loads and releases


class LoadMethod(enum.Enum):
    """The target's two load calls (the value is the gRPC method): a whole collection, or some partitions."""
    COLLECTION = "LoadCollection"
    PARTITIONS = "LoadPartitions"


class TargetMirror:
    """The target's catalog as one task sees it, and the calls that bring it to the source's state.

    Every change goes through ``apply``: when the target refuses it for a reason the source's own history
    explains (a partition still loaded when the source, which refuses the same, must have released it first),
    the matching repair runs and the call is tried again (each repair once); a refusal nothing explains stops the
    task with the operation, the object and the target's answer: at once when it says what is wrong with the
    request, else once the writer has retried it for ``retryTimeout`` (a target settling after a restart).
    """

    def __init__(self, writer: TargetWriter, task_id: str):
        self.writer, self.task_id = writer, task_id
        # described, by (database, name): the one owner of TargetCollection objects (TargetCopies points at these;
        # a fresh description of the same collection updates the object in place)
        self.collections: dict[tuple[str, str], TargetCollection] = {}
        self.load_kinds: dict[int, bool] = {}   # target collection id -> loaded as a whole (True) by this mirror
        # (target collection id, index name) -> source time of the index this mirror made there. A load read from
        # etcd can come before the replicate channel's CreateIndex, and its repair makes the source's current
        # index; the older creates and drops of that name that follow are then behind the target and skipped.
        self.index_times: dict[tuple[int, str], int] = {}

    # -- one checked call --------------------------------------------------------------------------------------

    def apply(self, op: str, method: str, request, db_name: str = "", ok_if: tuple[str | re.Pattern, ...] = (),
              repairs: Iterable[Repair] = (), transient_if: Callable[[Any], bool] | None = None):
        known = list(repairs)
        pending = list(known)
        while True:
            try:
                # A refusal any repair knows comes back at once, also once that repair is used up: it says what
                # is wrong, and a repair that did not help is no reason to wait.
                answer = self.writer.call(op, method, request, db_name,
                                          ok_if=(lambda s: answer_says(s, *ok_if)) if ok_if else None,
                                          transient_if=transient_if,
                                          explained_if=lambda s: any(r.applies(s) for r in known))
                if self.writer.metrics is not None:
                    self.writer.metrics.ddl(method)
                return answer
            except TargetRefusal as refusal:
                repair = next((r for r in pending if r.applies(refusal.status)), None)
                if repair is None:
                    raise TaskHalt(str(refusal)) from None
                pending.remove(repair)
                log.info("task=%s %s was refused (%s): %s first", self.task_id, op, status_text(refusal.status),
                         repair.why)
                try:
                    repair.fix()
                except Undone as undone:
                    log.info("task=%s %s skipped: %s", self.task_id, op, undone)
                    return None

    def base(self, msg_type: int, ts: int):
        return self.writer.base(msg_type, ts)

    # -- reads -------------------------------------------------------------------------------------------------

    def collection(self, db_name: str, name: str, fresh: bool = False) -> TargetCollection | None:
        key = (db_name, name)
        if fresh or key not in self.collections:
            described = self._describe(db_name, name)
            if described is None:
                self.collections.pop(key, None)
                return None
            known = self.collections.get(key)
            if known is not None and known.id == described.id:
                for name in (f.name for f in dataclasses.fields(described)):
                    setattr(known, name, getattr(described, name))
            else:
                self.collections[key] = described
        return self.collections[key]

    def _describe(self, db_name: str, name: str) -> TargetCollection | None:
        from pymilvus.grpc_gen import milvus_pb2
        response = self.writer.call(f"describe collection {db_name}.{name}", "DescribeCollection",
                                    milvus_pb2.DescribeCollectionRequest(db_name=db_name, collection_name=name),
                                    db_name, ok_if=lambda s: answer_says(s, *NOT_FOUND) or s.code == 100)
        if not status_ok(response.status):
            return None
        partitions = self.writer.call(f"show partitions of {db_name}.{name}", "ShowPartitions",
                                      milvus_pb2.ShowPartitionsRequest(db_name=db_name, collection_name=name),
                                      db_name)
        return TargetCollection(
            id=response.collectionID, db_name=db_name, name=name, created_ts=response.created_timestamp,
            vchannels=sorted(response.virtual_channel_names, key=shard_index),
            fields={f.name: f.fieldID for f in response.schema.fields},
            partitions=dict(zip(partitions.partition_names, partitions.partitionIDs, strict=True)))

    def databases(self) -> list[str]:
        from pymilvus.grpc_gen import milvus_pb2
        return list(self.writer.call("list databases", "ListDatabases", milvus_pb2.ListDatabasesRequest()).db_names)

    def collection_names(self, db_name: str) -> list[str]:
        from pymilvus.grpc_gen import milvus_pb2
        return list(self.writer.call(f"list collections of {db_name}", "ShowCollections",
                                     milvus_pb2.ShowCollectionsRequest(db_name=db_name), db_name).collection_names)

    def pchannels(self) -> set[str]:
        """Every pchannel of every collection on the target: all of them need ticks."""
        found = set()
        for db_name in self.databases():
            for name in self.collection_names(db_name):
                described = self.collection(db_name, name, fresh=True)
                if described is not None:
                    found.update(described.pchannels)
        return found

    def loaded(self, target: TargetCollection) -> tuple[bool, set[str]]:
        """(loaded at all, the loaded partitions) of a target collection."""
        from pymilvus.grpc_gen import milvus_pb2
        response = self.writer.call(f"show loaded partitions of {target.qualified_name}", "ShowPartitions",
                                    milvus_pb2.ShowPartitionsRequest(db_name=target.db_name,
                                                                     collection_name=target.name,
                                                                     type=milvus_pb2.InMemory),
                                    target.db_name, ok_if=lambda s: answer_says(s, "not loaded", *NOT_FOUND))
        partitions = set(response.partition_names) if status_ok(response.status) else set()
        return bool(partitions), partitions

    def indexes(self, target: TargetCollection) -> dict[str, tuple[str, dict[str, str]]]:
        """index name -> (field name, params) of a target collection."""
        from pymilvus.grpc_gen import milvus_pb2
        response = self.writer.call(f"describe indexes of {target.qualified_name}", "DescribeIndex",
                                    milvus_pb2.DescribeIndexRequest(db_name=target.db_name,
                                                                    collection_name=target.name),
                                    target.db_name, ok_if=lambda s: answer_says(s, *NOT_FOUND) or s.code == 700)
        return {d.index_name: (d.field_name, {p.key: p.value for p in d.params})
                for d in response.index_descriptions}

    # -- databases ---------------------------------------------------------------------------------------------

    def create_database(self, db_name: str, ts: int) -> None:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        self.apply(f"create database {db_name}", "CreateDatabase",
                   milvus_pb2.CreateDatabaseRequest(base=self.base(common_pb2.CreateDatabase, ts), db_name=db_name),
                   ok_if=ALREADY_EXISTS)

    def drop_database(self, db_name: str, ts: int, drop_leftover: Callable[[TargetCollection, int], bool]) -> None:
        """Drop a database; its collections go first when ``drop_leftover`` finds them dropped on the source (which
        refuses to drop a database that is not empty).

        A copy made after the drop's time (copies carry their source's creation time) cannot have been in the
        database the source dropped: the target's database is a later one of that name, made again since (a drop
        replayed after a pause or restart, the catalog having made the newer copies already), so the drop is
        behind it and skipped."""
        from pymilvus.grpc_gen import common_pb2, milvus_pb2

        def drop_leftovers():
            newer = []
            for name in self.collection_names(db_name):
                target = self.collection(db_name, name, fresh=True)
                if target is not None and target.created_ts > ts:
                    newer.append(target.qualified_name)
                elif target is not None:
                    drop_leftover(target, ts)
            if newer:
                raise Undone(f"the target's {db_name} is a later database of that name: it holds "
                             f"{', '.join(sorted(newer))}, created after this drop")
        self.apply(f"drop database {db_name}", "DropDatabase",
                   milvus_pb2.DropDatabaseRequest(base=self.base(common_pb2.DropDatabase, ts), db_name=db_name),
                   ok_if=NOT_FOUND, repairs=[Repair(lambda s: answer_says(s, "not empty"), drop_leftovers,
                                                    "dropping the collections the source dropped before")])

    # -- collections and partitions ----------------------------------------------------------------------------

    def create_collection(self, request) -> TargetCollection:
        op = f"create collection {request.db_name}.{request.collection_name}"
        self.apply(op, "CreateCollection", request, request.db_name)
        created = self.collection(request.db_name, request.collection_name, fresh=True)
        if created is None:
            raise TargetError(f"{op}: missing on the target right after its creation")
        return created

    def drop_collection(self, target: TargetCollection, ts: int, messages: Iterable[tuple[str, bytes]],
                        outbox: Outbox | None = None) -> None:
        """Drop a collection: its drop messages first through the channels (so its shards stop), then the call."""
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        if outbox is not None:
            for pchannel, message in messages:
                outbox.add(pchannel, message)
            outbox.flush()
        self.apply(f"drop collection {target.qualified_name}", "DropCollection",
                   milvus_pb2.DropCollectionRequest(base=self.base(common_pb2.DropCollection, ts),
                                                    db_name=target.db_name, collection_name=target.name),
                   target.db_name, ok_if=NOT_FOUND)
        self.collections.pop((target.db_name, target.name), None)
        self.index_times = {key: ts_ for key, ts_ in self.index_times.items() if key[0] != target.id}

    def ensure_partition(self, target: TargetCollection, name: str, ts: int) -> int:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        if name in target.partitions:
            return target.partitions[name]
        self.apply(f"create partition {target.qualified_name}/{name}", "CreatePartition",
                   milvus_pb2.CreatePartitionRequest(base=self.base(common_pb2.CreatePartition, ts),
                                                     db_name=target.db_name, collection_name=target.name,
                                                     partition_name=name),
                   target.db_name, ok_if=ALREADY_EXISTS,
                   # a collection made at a source time ahead of the target's clock is not there yet
                   transient_if=lambda s: answer_says(s, "key not found", "no value found"))
        refreshed = self.collection(target.db_name, target.name, fresh=True)  # ``target`` itself, refreshed
        if refreshed is None or name not in refreshed.partitions:
            raise TargetError(f"create partition {target.qualified_name}/{name}: missing on the target right "
                              f"after its creation")
        return refreshed.partitions[name]

    def drop_partition(self, target: TargetCollection, name: str, ts: int, outbox: Outbox,
                       messages: Iterable[tuple[str, bytes]]) -> None:
        """Drop a partition; a loaded one is released first (the source refuses to drop a loaded partition, so it
        released it before)."""
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        for pchannel, message in messages:
            outbox.add(pchannel, message)
        outbox.flush()
        self.apply(f"drop partition {target.qualified_name}/{name}", "DropPartition",
                   milvus_pb2.DropPartitionRequest(base=self.base(common_pb2.DropPartition, ts),
                                                   db_name=target.db_name, collection_name=target.name,
                                                   partition_name=name),
                   target.db_name, ok_if=NOT_FOUND,
                   repairs=[Repair(lambda s: answer_says(s, "loaded", "release"),
                                   lambda: self.release_partitions(target, [name], ts), "releasing it")])
        target.partitions.pop(name, None)

    # -- indexes -----------------------------------------------------------------------------------------------

    def create_index(self, target: TargetCollection, field_name: str, index_name: str,
                     params: Iterable[tuple[str, str]], ts: int, unwanted: Callable[[str], bool]) -> None:
        """Create an index; an index of the same field that ``unwanted`` says the source dropped is dropped
        first (Milvus keeps one index per field)."""
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        if self.index_times.get((target.id, index_name), -1) > ts:
            log.info("task=%s create index %s of %s skipped: the target has a later index of that name already",
                     self.task_id, index_name, target.qualified_name)
            return

        def drop_unwanted():
            for name, (field_name_, _) in self.indexes(target).items():
                if field_name_ == field_name and name != index_name and unwanted(name):
                    self.drop_index(target, field_name, name, ts)
        self.apply(f"create index {index_name or field_name} of {target.qualified_name}", "CreateIndex",
                   milvus_pb2.CreateIndexRequest(base=self.base(common_pb2.CreateIndex, ts), db_name=target.db_name,
                                                 collection_name=target.name, field_name=field_name,
                                                 index_name=index_name,
                                                 extra_params=[common_pb2.KeyValuePair(key=k, value=v)
                                                               for k, v in params]),
                   target.db_name,
                   repairs=[Repair(lambda s: answer_says(s, "at most one distinct index",
                                                         "multiple indexes on same field"),
                                   drop_unwanted, "dropping the index the source dropped before")])
        self.index_times[(target.id, index_name)] = ts

    def drop_index(self, target: TargetCollection, field_name: str, index_name: str, ts: int) -> None:
        """Drop an index; the collection is released first when loaded (the source refuses the same)."""
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        if self.index_times.get((target.id, index_name), -1) > ts:
            log.info("task=%s drop index %s of %s skipped: the target's index of that name is a later one",
                     self.task_id, index_name, target.qualified_name)
            return
        self.apply(f"drop index {index_name or field_name} of {target.qualified_name}", "DropIndex",
                   milvus_pb2.DropIndexRequest(base=self.base(common_pb2.DropIndex, ts), db_name=target.db_name,
                                               collection_name=target.name, field_name=field_name,
                                               index_name=index_name),
                   target.db_name, ok_if=NOT_FOUND + ("index not exist",),
                   repairs=[Repair(lambda s: answer_says(s, "loaded", "release"),
                                   lambda: self.release_collection(target, ts), "releasing the collection")])
        self.index_times.pop((target.id, index_name), None)

    # -- load state --------------------------------------------------------------------------------------------

    def release_collection(self, target: TargetCollection, ts: int) -> None:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        self.apply(f"release collection {target.qualified_name}", "ReleaseCollection",
                   milvus_pb2.ReleaseCollectionRequest(base=self.base(common_pb2.ReleaseCollection, ts),
                                                       db_name=target.db_name, collection_name=target.name),
                   target.db_name, ok_if=NOT_FOUND + ("not loaded",))
        self.load_kinds.pop(target.id, None)

    def release_partitions(self, target: TargetCollection, names: Iterable[str], ts: int) -> None:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        names = sorted(names)
        self.apply(f"release partitions {names} of {target.qualified_name}", "ReleasePartitions",
                   milvus_pb2.ReleasePartitionsRequest(base=self.base(common_pb2.ReleasePartitions, ts),
                                                       db_name=target.db_name, collection_name=target.name,
                                                       partition_names=names),
                   target.db_name, ok_if=NOT_FOUND + ("not loaded",))

    def set_load(self, target: TargetCollection, wanted: WantedLoad | None, ts: int,
                 create_indexes: Callable[[], None]) -> None:
        """Bring a collection's load state on the target to ``wanted`` (None: released).

        Milvus 2.3 loads a whole collection over a partial load and partitions over a whole one, and a partition
        created in a collection loaded as a whole is loaded with it; so the load kind matters, and the mirror
        remembers the one it made (a load made before this task's run is taken to be the source's kind).
        """
        loaded, partitions = self.loaded(target)
        if wanted is None or not loaded:
            if loaded:
                self.release_collection(target, ts)
            if wanted is None:
                return
            partitions = set()
        if loaded and self.load_kinds.get(target.id, wanted.whole) != wanted.whole:
            self.release_collection(target, ts)  # the other kind: start over
            partitions = set()
        if wanted.whole:
            if not partitions or wanted.partitions - partitions:
                if not self._load(target, LoadMethod.COLLECTION, [], wanted.replicas, ts, create_indexes):
                    return
                partitions = set(target.partitions)
        else:
            if not self._load(target, LoadMethod.PARTITIONS, sorted(wanted.partitions - partitions), wanted.replicas,
                              ts, create_indexes):
                return
            partitions |= wanted.partitions
        self.load_kinds[target.id] = wanted.whole
        if partitions - wanted.partitions and not wanted.partition_key:
            self.release_partitions(target, partitions - wanted.partitions, ts)

    def _load(self, target: TargetCollection, method: LoadMethod, partitions: list[str], replicas: int, ts: int,
              create_indexes: Callable[[], None]) -> bool:
        """False when the load was skipped: the source's history undid it (see Undone)."""
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        if method == LoadMethod.PARTITIONS and not partitions:
            return True
        request = (milvus_pb2.LoadCollectionRequest(base=self.base(common_pb2.LoadCollection, ts))
                   if method == LoadMethod.COLLECTION else
                   milvus_pb2.LoadPartitionsRequest(base=self.base(common_pb2.LoadPartitions, ts),
                                                    partition_names=partitions))
        request.db_name, request.collection_name, request.replica_number = target.db_name, target.name, replicas
        answer = self.apply(f"{'load collection' if not partitions else f'load partitions {partitions} of'} "
                            f"{target.qualified_name}", method.value, request, target.db_name, repairs=[
                                Repair(lambda s: answer_says(s, "index not found", "no vector index"),
                                       create_indexes, "creating the source's indexes"),
                                Repair(lambda s: answer_says(s, "replica number"),
                                       lambda: self.release_collection(target, ts),
                                       "releasing the collection (its replica number changed)")])
        return answer is not None

    def flush(self, db_name: str, names: list[str], ts: int) -> None:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        self.apply(f"flush {db_name}.{','.join(names)}", "Flush",
                   milvus_pb2.FlushRequest(base=self.base(common_pb2.Flush, ts), db_name=db_name,
                                           collection_names=names),
                   db_name, ok_if=NOT_FOUND,
                   # the target's datanode watches a channel only after its first tick
                   transient_if=lambda s: answer_says(s, "channel not found"))


###############################################################################
# Ordering: one timestamp order over every input ###############################
###############################################################################

class InputKind(enum.IntEnum):
    """What an input of a task carries. At equal timestamps the lower kind is applied first: a collection seen in
    the catalog before its first data, data before an operation of the replicate channel."""
    CATALOG = 0     # changes derived from the source's etcd
    DATA = 1        # a DML channel
    OPERATIONS = 2  # the replicate channel


@dataclass(frozen=True, order=True)
class Change:
    """One change read from an input: a source message or a catalog change, at its source timestamp."""
    ts: int
    kind: InputKind
    seq: int
    input: str = field(compare=False)
    item: Any = field(compare=False)
    position: bytes = field(compare=False, default=b"")  # the MQ id of a message, to resume at
    size: int = field(compare=False, default=0)          # bytes its item holds


@dataclass
class _Input:
    name: str
    kind: InputKind
    skip_until: int                      # changes at or below were applied before a restart
    generation: int = 0                  # which time the input was added: offers from another are stale
    skip_positions: set[bytes] = field(default_factory=set)  # applied before a restart, not yet read again
    applied_behind: list[tuple[int, bytes]] = field(default_factory=list)  # (seq, position) committed while an
    #                                    earlier change of the input is still pending: the resume point is before them
    promised: int | None = None          # nothing at or below this can still arrive
    pending: list[Change] = field(default_factory=list)   # in arrival order
    last: StartAt | None = None          # after the last position read, or where reading started


class ChangeOrder:
    """The order in which a task applies changes, and the rule that makes it the source's order.

    The rule: every input (each DML channel, the replicate channel, the source's catalog in etcd) promises a
    timestamp below which it has delivered everything (a channel's time tick; the replicate channel's read
    position reaching the end observed after that tick was read; an etcd poll started after it was read). The
    watermark is the lowest promise of all inputs, and only changes at or below it are applied, in (timestamp,
    input kind, arrival) order. So a change that the source completed before another one was issued is applied
    first, whichever inputs carry them. An input that has promised nothing yet (a channel just added) holds the
    watermark where it is. A change that arrives at or below what is already applied (an operation whose write
    lagged its own timestamp) is applied at once.

    Pure bookkeeping, no I/O: the applier offers changes and promises, takes what is ready, and commits what it
    applied.
    """

    def __init__(self, applied: int = 0):
        self.applied = applied  # all at or below is on the target: owned here (moved by commit and resume_at)
        self.inputs: dict[str, _Input] = {}
        self.seq = 0
        self.added = False  # an input was added since the last take(): the watermark must be recomputed
        self.out: set[int] = set()  # seqs handed out, not committed
        self.held_bytes = 0         # of the items of changes not handed out (what waiting costs in memory)

    def add_input(self, name: str, kind: InputKind, start: StartAt | None = None, skip_until: int = 0,
                  generation: int = 0, durable: int = 0, skip_positions: Iterable[bytes] = ()) -> None:
        """An input read from ``start``, after a restart from a checkpoint at time ``durable`` that says the
        messages at ``skip_positions`` were applied; ``skip_until`` drops what is at or below that time.

        What a DML channel holds at or below the checkpoint's time came before a tick above it, so it is
        applied; an operation is written to the replicate channel when it finished, after its timestamp (and
        maybe after the checkpoint passed it): only its position tells."""
        if kind != InputKind.OPERATIONS:
            skip_until = max(skip_until, durable)
        if name not in self.inputs:
            self.inputs[name] = _Input(name, kind, skip_until, generation, set(skip_positions),
                                       last=start if start and start.msg_id else None)
            self.added = True

    def resume_at(self, applied: int) -> None:
        """A restart from a checkpoint at ``applied``: everything at or below is on the target already."""
        self.applied = max(self.applied, applied)

    def remove_input(self, name: str) -> None:
        removed = self.inputs.pop(name, None)
        if removed is not None:
            self.held_bytes -= sum(c.size for c in removed.pending if c.item is not None)

    def has_input(self, name: str) -> bool:
        return name in self.inputs

    def _current(self, name: str, generation: int | None) -> _Input | None:
        """The input, unless it was removed, or removed and added again since this was read (``generation``)."""
        source = self.inputs.get(name)
        if source is None or generation is not None and generation != source.generation:
            return None
        return source

    def offer(self, name: str, ts: int, item: Any, position: bytes = b"", generation: int | None = None) -> None:
        source = self._current(name, generation)
        if source is None:
            return  # read before its input was removed (and maybe added again)
        if position:
            source.last = StartAt(StartKind.AFTER, position)
        if ts <= source.skip_until or position in source.skip_positions:
            source.skip_positions.discard(position)
            return
        self.seq += 1
        size = len(getattr(item, "payload", b""))
        source.pending.append(Change(ts, source.kind, self.seq, name, item, position, size))
        self.held_bytes += size

    def promise(self, name: str, ts: int, position: bytes = b"", generation: int | None = None) -> None:
        source = self._current(name, generation)
        if source is None:
            return
        if position:
            source.last = StartAt(StartKind.AFTER, position)
        source.promised = ts if source.promised is None else max(source.promised, ts)

    def watermark(self) -> int:
        promises = [source.promised for source in self.inputs.values() if source.promised is not None]
        if not promises or len(promises) < len(self.inputs):  # none, or one input promised nothing yet
            return self.applied
        return max(self.applied, min(promises))

    def take(self) -> tuple[list[Change], int]:
        """The changes ready to apply, in order (but those handed out already), and the watermark they were
        taken at."""
        self.added = False
        watermark = self.watermark()
        ready = sorted(c for source in self.inputs.values() for c in source.pending
                       if c.ts <= watermark and c.seq not in self.out)
        return ready, watermark

    def hand_out(self, changes: list[Change]) -> list[int]:
        """These are applied but not yet on the target for sure: not taken again, not committed yet. Only their
        places stay (their items are let go: what was applied needs no memory here). Returns their seqs."""
        seqs = {c.seq for c in changes}
        self.out |= seqs
        self.held_bytes -= sum(c.size for c in changes)
        for source in self.inputs.values():
            source.pending = [dataclasses.replace(c, item=None) if c.seq in seqs else c for c in source.pending]
        return sorted(seqs)

    def commit(self, done: Iterable[int], upto: int) -> None:
        """The changes ``done`` (seqs) are on the target, and so is everything of the inputs at or below
        ``upto``."""
        applied = set(done)
        for source in self.inputs.values():
            behind = source.applied_behind + [(c.seq, c.position) for c in source.pending
                                              if c.seq in applied and c.position]
            source.pending = [c for c in source.pending if c.seq not in applied]
            first = next((c.seq for c in source.pending if c.position), None)
            source.applied_behind = [(seq, p) for seq, p in behind if first is not None and seq > first]
        self.out -= applied
        self.applied = max(self.applied, upto)

    def resume(self, name: str) -> StartAt | None:
        """Where to read an input again after a restart: at its first change not applied, else after the last
        position read (ticks included)."""
        source = self.inputs[name]
        for change in source.pending:
            if change.position:
                return StartAt(StartKind.AT, change.position)
        return source.last

    def applied_after_resume(self, name: str) -> tuple[bytes, ...]:
        """The positions after ``resume(name)`` whose messages are applied: a restart skips exactly these."""
        source = self.inputs[name]
        return tuple(sorted(source.skip_positions)) + tuple(p for _, p in source.applied_behind)

    def holding(self) -> list[str]:
        """The inputs that hold back a change waiting above the watermark: those that promised nothing yet, else
        those with the lowest promise. Empty when nothing waits."""
        watermark = self.watermark()
        if not any(c.ts > watermark for source in self.inputs.values() for c in source.pending):
            return []
        silent = [n for n, s in self.inputs.items() if s.promised is None]
        if silent:
            return sorted(silent)
        lowest = min(s.promised for s in self.inputs.values() if s.promised is not None)  # all promised by now
        return sorted(n for n, s in self.inputs.items() if s.promised == lowest)

    def held_by_only(self, kind: InputKind) -> bool:
        """Is every input that holds back a waiting change of this kind?"""
        holding = self.holding()
        return bool(holding) and all(self.inputs[name].kind == kind for name in holding)

    def names(self, kind: InputKind | None = None) -> list[str]:
        return sorted(n for n, s in self.inputs.items() if kind is None or s.kind == kind)


###############################################################################
# Replication task: definition and clocks ######################################
###############################################################################

def hybrid_now() -> int:
    from pymilvus.client.utils import mkts_from_unixtime
    return mkts_from_unixtime(time.time())


def ts_seconds(ts: int) -> float:
    from pymilvus.client.utils import hybridts_to_unixtime
    return hybridts_to_unixtime(ts)


def channel_lag(channel: str, confirmed_ts: int, now: float) -> dict:
    """How far a source channel is confirmed on the target, as `get` shows it."""
    return {"channel": channel, "confirmed_ts": confirmed_ts,
            "confirmed_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_seconds(confirmed_ts)))
            if confirmed_ts else None,
            "lag_seconds": round(max(0.0, now - ts_seconds(confirmed_ts)), 3) if confirmed_ts else None}


class TaskState(str, enum.Enum):
    INITIAL = "Initial"
    RUNNING = "Running"
    PAUSED = "Paused"


class CollectionFilter:
    """Which collections a task replicates: ``*`` for all, ``db.*`` for every collection of a database, else names
    (``name`` in the default database or ``db.name``)."""

    def __init__(self, names: list[str]):
        self.everything = "*" in names
        qualified = {n if "." in n else f"{DEFAULT_DB}.{n}" for n in names if n != "*"}
        self.databases = {n[:-2] for n in qualified if n.endswith(".*")}
        self.names = {n for n in qualified if not n.endswith(".*")}

    def matches(self, db_name: str, name: str) -> bool:
        db_name = db_name or DEFAULT_DB
        return self.everything or db_name in self.databases or f"{db_name}.{name}" in self.names

    def covers_database(self, db_name: str) -> bool:
        """Does the task replicate the database itself (its create and drop), not only some collections in it?"""
        return self.everything or (db_name or DEFAULT_DB) in self.databases

    def overlaps(self, other: "CollectionFilter") -> bool:
        if self.everything or other.everything or self.databases & other.databases or self.names & other.names:
            return True
        return any(n.split(".", 1)[0] in other.databases for n in self.names) or \
            any(n.split(".", 1)[0] in self.databases for n in other.names)


class NameMap:
    """Where a source database and collection live on the target (``name_mapping``): a mapped database takes all its
    collections along, a mapped collection takes the name given; everything else keeps its own name."""

    def __init__(self, mappings: list[dict] | None = None):
        self.mappings = mappings or []
        self.databases = {m["source_db"]: m["target_db"] for m in self.mappings}
        self.collections = {(m["source_db"], s): t for m in self.mappings
                            for s, t in m.get("collection_mapping", {}).items()}
        self.source_databases = {t: s for s, t in self.databases.items()}
        self.source_collections = {(self.databases[db], t): s for (db, s), t in self.collections.items()}

    def database(self, db_name: str) -> str:
        return self.databases.get(db_name or DEFAULT_DB, db_name or DEFAULT_DB)

    def collection(self, db_name: str, name: str) -> tuple[str, str]:
        db_name = db_name or DEFAULT_DB
        return self.database(db_name), self.collections.get((db_name, name), name)

    def source(self, db_name: str, name: str) -> tuple[str, str]:
        """The source names of a target collection that is a copy (the inverse of ``collection``)."""
        source_db = self.source_databases.get(db_name, db_name)
        return source_db, self.source_collections.get((db_name, name), name)


@dataclass(frozen=True)
class StartPosition:
    """Where a new task starts reading one source channel, instead of at its latest offset: at ``msg_id``, skipping
    what is at or below ``timestamp`` (already on the target, as after a restore). ``collection`` (``db.name``)
    limits it to one collection's messages; empty, it stands for every collection on the channel."""
    channel: str
    msg_id: bytes
    timestamp: int = 0
    collection: str = ""

    def to_json(self) -> dict:
        return {"channel": self.channel, "msg_id": base64.b64encode(self.msg_id).decode(),
                "timestamp": self.timestamp, "collection": self.collection}

    @classmethod
    def from_json(cls, data: dict) -> "StartPosition":
        return cls(data["channel"], base64.b64decode(data["msg_id"]), int(data.get("timestamp", 0)),
                   data.get("collection", ""))

    @classmethod
    def decode(cls, key: str, text: str, collection: str = "") -> "StartPosition":
        """A position as the Go CDC's requests carry it: ``key`` a physical or virtual channel, ``text`` base64 of
        a serialized ``MsgPosition`` (what `position` answers and milvus-backup keeps) or of a bare MQ message id.
        ValueError says what is wrong."""
        from google.protobuf.message import DecodeError
        from pymilvus.grpc_gen import msg_pb2
        channel = pchannel_of(key)
        try:
            raw = base64.b64decode(text, validate=True)
        except (ValueError, TypeError):
            raise ValueError("is not base64") from None
        if not raw:
            raise ValueError("is empty")
        try:
            position = msg_pb2.MsgPosition.FromString(raw)
        except DecodeError:
            position = None
        # A bare id can parse as a MsgPosition by chance; one that names this very channel cannot.
        if position is not None and position.msgID and pchannel_of(position.channel_name) == channel:
            return cls(channel, position.msgID, position.timestamp, collection)
        return cls(channel, raw, 0, collection)

    def encode(self) -> str:
        """Base64 of a ``MsgPosition``, the form the Go CDC's `position` answers and its create takes."""
        from pymilvus.grpc_gen import msg_pb2
        return base64.b64encode(msg_pb2.MsgPosition(channel_name=self.channel, msgID=self.msg_id,
                                                    timestamp=self.timestamp).SerializeToString()).decode()


@dataclass
class TaskInfo:
    """A task as stored in the meta store: what the create request asked for, checked and normalized, and its state.
    The token lives here and nowhere the API shows."""
    task_id: str
    connect: ConnectParam
    collection_infos: list[dict]
    state: TaskState = TaskState.INITIAL
    reason: str = ""
    replay_existing: bool = False
    created_at: float = field(default_factory=time.time)
    db_collections: dict[str, list[dict]] = field(default_factory=dict)
    name_mapping: list[dict] = field(default_factory=list)
    start_positions: list[StartPosition] = field(default_factory=list)  # used by the first start only
    disable_auto_start: bool = False  # created stopped; a server restart does not start it either
    connect_shown: dict = field(default_factory=dict)  # the Go style fields of milvus_connect_param, as given
    last_verify: dict = field(default_factory=dict)  # the result of its last verify run, as `get` shows it

    def scope_infos(self) -> list[tuple[str, dict]]:
        """Every collection the task was given: (its name as CollectionFilter takes it, its collection info)."""
        return [(c["name"], c) for c in self.collection_infos] + \
            [("*" if db == "*" else f"{db}.{c['name']}", c)
             for db, infos in sorted(self.db_collections.items()) for c in infos]

    def scope(self) -> list[str]:
        return [name for name, _ in self.scope_infos()]

    @property
    def filter(self) -> CollectionFilter:
        return CollectionFilter(self.scope())

    @property
    def names(self) -> NameMap:
        return NameMap(self.name_mapping)

    @property
    def replayed(self) -> CollectionFilter:
        """The collections to replay from their creation (``use_start_position``; a database's ``*`` too)."""
        return CollectionFilter([name for name, info in self.scope_infos() if info.get("use_start_position")])

    def to_store(self) -> dict:
        stored = {"task_id": self.task_id, "milvus_connect_param": self.connect_json(secrets=True),
                  "collection_infos": self.collection_infos, "state": self.state.value, "reason": self.reason,
                  "replay_existing": self.replay_existing, "created_at": self.created_at}
        if self.db_collections:
            stored["db_collections"] = self.db_collections
        if self.name_mapping:
            stored["name_mapping"] = self.name_mapping
        if self.start_positions:
            stored["start_positions"] = [p.to_json() for p in self.start_positions]
        if self.disable_auto_start:
            stored["disable_auto_start"] = True
        if self.last_verify:
            stored["last_verify"] = self.last_verify
        return stored

    @classmethod
    def from_store(cls, data: dict) -> "TaskInfo":
        param = data["milvus_connect_param"]
        connect = ConnectParam(uri=param["uri"], token=param.get("token", ""),
                               connect_timeout=float(param.get("connect_timeout", 10)),
                               dial_config=tuple(sorted((param.get("dial_config") or {}).items())))
        return cls(task_id=data["task_id"], connect=connect, collection_infos=data["collection_infos"],
                   state=TaskState(data.get("state", TaskState.INITIAL.value)), reason=data.get("reason", ""),
                   replay_existing=bool(data.get("replay_existing")), created_at=data.get("created_at", 0),
                   db_collections=data.get("db_collections") or {}, name_mapping=data.get("name_mapping") or [],
                   start_positions=[StartPosition.from_json(p) for p in data.get("start_positions") or []],
                   disable_auto_start=bool(data.get("disable_auto_start")),
                   connect_shown={k: param[k] for k in GO_CONNECT_KEYS if k in param},
                   last_verify=data.get("last_verify") or {})

    def connect_json(self, secrets: bool = False) -> dict:
        shown: dict[str, Any] = {"uri": self.connect.uri, "connect_timeout": self.connect.connect_timeout}
        shown.update(self.connect_shown)
        if self.connect.dial_config:
            shown["dial_config"] = dict(self.connect.dial_config)
        if secrets and self.connect.token:
            shown["token"] = self.connect.token
        return shown

    def public(self) -> dict:
        shown: dict[str, Any] = {"task_id": self.task_id, "milvus_connect_param": self.connect_json(),
                                 "collection_infos": self.collection_infos, "state": self.state.value}
        for key in ("db_collections", "name_mapping", "disable_auto_start", "replay_existing"):
            if getattr(self, key):
                shown[key] = getattr(self, key)
        if self.reason:
            shown["reason"] = self.reason
        return shown


class CheckpointRecord:
    """A task's last stored checkpoint: its time (how far the task's changes are durable), the channels it covers,
    what held the order back then, and when it was stored. The one record of the durable time: the applier tells
    it, the target's ticker, `get` and the metrics ask it (from their own threads, hence the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ts = 0
        self._channels: tuple[str, ...] = ()
        self._waiting_for: list[str] = []
        self._at = 0.0  # time.time() of the store, 0 before the first

    def resumed(self, ts: int) -> None:
        """Read back from the meta store at start: durable, but not stored by this run."""
        with self._lock:
            self._ts = ts

    def stored(self, ts: int, channels: Iterable[str], waiting_for: list[str]) -> None:
        with self._lock:
            self._ts, self._channels, self._waiting_for, self._at = ts, tuple(channels), waiting_for, time.time()

    @property
    def ts(self) -> int:
        with self._lock:
            return self._ts

    @property
    def at(self) -> float:
        with self._lock:
            return self._at

    def shown(self) -> tuple[dict[str, int], list[str]]:
        """(channel -> its durable time, what held the order back) as of the last checkpoint stored."""
        with self._lock:
            return {name: self._ts for name in self._channels}, list(self._waiting_for)


class TargetClock:
    """Time ticks for one target Milvus, shared by every task writing to it.

    The target makes no ticks of its own: its data becomes visible, and its datanode moves on, only as ticks
    arrive on every pchannel that hosts a collection. A tick on a channel never goes backwards and never passes
    the durable checkpoint of any task writing to that target, so a task that restarts after a crash re-sends
    its unconfirmed messages into the same open tick window, where the target drops them as repeats.

    One ticker thread of its own sends them: tasks only post that their durable time moved, and the ticker asks
    it of each task's CheckpointRecord (no lock is held while the target is called, and ticks on a channel go out
    in order). A target that is down is waited out; the tasks writing to it see the same fault in their own calls.
    """

    def __init__(self, retry: RetryPolicy, address: str,
                 make_writer: Callable[[ConnectParam, Patience, tuple[Lease, str] | None], Any] | None = None,
                 metrics: Metrics | None = None):
        self.retry, self.address, self.metrics = retry, address, metrics
        self.make_writer = make_writer or (lambda param, patience, fence: TargetWriter(param, patience, fence=fence))
        self.changed = threading.Condition()
        # task id -> its durable time, asked (each task's CheckpointRecord owns it)
        self.watermarks: dict[str, Callable[[], int]] = {}
        self.channels: set[str] = set()
        self.param: ConnectParam | None = None
        self.posted = 0                   # bumped at every change, so the ticker knows it has work
        self.ticked = 0                   # every channel has had a tick at least this high (set by the ticker)
        # in a cluster: ticks only while this server holds the target (owned here: set through hold_with)
        self.fence: Lease | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.waits = Waits()              # what the ticker waits out; every task on this target shows it in get

    def join(self, task_id: str, durable: Callable[[], int], param: ConnectParam) -> None:
        """``durable``: asks the task's durable time (it must not block: it is asked under this clock's lock)."""
        with self.changed:
            self.watermarks[task_id] = durable
            self.param = param
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=f"cdc-tick-{self.address}", daemon=True)
                self.thread.start()
            self._post()

    def leave(self, task_id: str) -> None:
        with self.changed:
            self.watermarks.pop(task_id, None)
            self._post()

    def add_channels(self, pchannels: Iterable[str]) -> None:
        with self.changed:
            self.channels.update(pchannels)
            self._post()

    def advance(self, task_id: str) -> None:
        """A task's durable time moved: tick every channel up to the lowest of them."""
        with self.changed:
            if task_id in self.watermarks:
                self._post()

    def wait_ticked(self, ts: int, timeout: float) -> bool:
        """Wait until every channel has had a tick at ``ts`` or above (False after ``timeout``, or at once when
        ticks cannot go out: the clock closing, the lease gone)."""
        with self.changed:
            return self.changed.wait_for(
                lambda: self.ticked >= ts or self.stopping.is_set() or
                (self.fence is not None and not self.fence.valid()), timeout) and self.ticked >= ts

    def hold_with(self, fence: Lease | None) -> None:
        """Tick only while ``fence`` is valid (in a cluster: this server's hold on the target)."""
        with self.changed:
            self.fence = fence

    def _post(self) -> None:
        self.posted += 1
        self.changed.notify_all()

    def _ticked(self, tick: int) -> None:
        if tick > self.ticked:
            self.ticked = tick
            self.changed.notify_all()
            if self.metrics is not None:
                self.metrics.reached(Stage.TICKED, tick)

    def close(self) -> None:
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()
        if self.thread is not None:
            self.thread.join(10)

    def _run(self) -> None:
        sent: dict[str, int] = {}
        seen, writer, made_for = 0, None, None
        patience = Patience(self.retry, self.stopping, self.waits, "ticker", f"ticker:{self.address}")
        failing_since, failures = 0.0, 0  # since when, and how many rounds of ticks failed since the last went out
        while not self.stopping.is_set():
            with self.changed:
                while self.posted == seen and not self.stopping.is_set():
                    self.changed.wait(1.0)
                seen, param, fence = self.posted, self.param, self.fence
                assert param is not None  # join sets it before it starts this thread
                if fence is not None and not fence.valid():
                    continue  # the target may be another server's by now
                tick = min(durable() for durable in self.watermarks.values()) if self.watermarks else 0
                due = sorted(c for c in self.channels if tick > sent.get(c, 0))
                if not due:
                    self._ticked(tick)
            if not due:
                continue
            try:
                if writer is None or (param, fence) != made_for:
                    if writer is not None:
                        writer.close()
                    writer = None  # so that a writer that cannot be made is tried again, not the closed one
                    # fenced: every try of every tick checks the lease, also the retries after a backoff
                    writer = self.make_writer(param, patience, (fence, self.address) if fence else None)
                    made_for = (param, fence)
                for pchannel in due:
                    writer.replicate(pchannel, [MessageRewriter.time_tick(tick)])
                    sent[pchannel] = tick
            except TaskStopping:
                break
            except LeaseLost as exc:  # not a fault: another server ticks this target now
                log.info("ticks to %s stop here: %s", self.address, exc)
            except Exception as exc:  # noqa: BLE001 - whatever it is (a TLS file rotated away...), ticks go on
                # Without ticks the target's data stops becoming visible: never end the thread, say why in get.
                failing_since, failures = failing_since or time.time(), failures + 1
                self.waits.set("ticker", Wait(f"sending time ticks to {self.address}", failing_since, failures,
                                              describe_error(exc)))
                log.warning("ticks to %s: %s; trying again", self.address, describe_error(exc))
                with self.changed:
                    self.posted += 1  # not sent: try again
                self.stopping.wait(self.retry.delay(failures))
            else:
                with self.changed:
                    self._ticked(tick)
                if failures:
                    log.info("ticks to %s go out again", self.address)
                    failing_since, failures = 0.0, 0
                    self.waits.clear("ticker")
        if writer is not None:
            writer.close()


class SourceClock:
    """The latest source time a task has evidence of: the highest time tick read on any of its channels. The
    reader thread writes it; the catalog thread and the replicate channel's promise read it.

    With no tick for a while (no collection on the channels read, or none at all) the source's own clock stands
    in, as the catalog thread last read it from the source's TSO (``SourceMeta.source_time``) plus the time
    elapsed since on this host's monotonic clock: never this host's wall clock, which may run ahead of the
    source's, and then a new collection's first inserts would fall below what is already applied.
    """

    FALLBACK_AFTER = 1.0

    def __init__(self):
        self.moved = threading.Condition()
        self.tick, self.tick_at = 0, 0.0
        self.passed, self.passed_at = 0.0, 0.0

    def saw_tick(self, ts: int) -> None:
        with self.moved:
            if ts > self.tick:
                self.tick, self.tick_at = ts, time.monotonic()
                self.moved.notify_all()

    def saw_source_time(self, passed: float, read_at: float) -> None:
        """The source's clock had passed ``passed`` (Unix seconds) at ``read_at`` (time.monotonic())."""
        with self.moved:
            if passed > self.passed:
                self.passed, self.passed_at = passed, read_at

    def wait_past(self, ts: int, timeout: float) -> None:
        """Until a tick above ``ts`` is read, or ``timeout``: a catalog poll right after each new tick keeps the
        catalog's promise as close behind the source as the ticks themselves."""
        with self.moved:
            self.moved.wait_for(lambda: self.tick > ts, timeout)

    def standing_in(self) -> bool:
        """Is the source's clock standing in for time ticks (none for a while)?"""
        with self.moved:
            return time.monotonic() - self.tick_at > self.FALLBACK_AFTER

    def now(self) -> int:
        from pymilvus.client.utils import mkts_from_unixtime
        with self.moved:
            tick, tick_at, passed, passed_at = self.tick, self.tick_at, self.passed, self.passed_at
        if passed and time.monotonic() - tick_at > self.FALLBACK_AFTER:
            return max(tick, mkts_from_unixtime(passed + time.monotonic() - passed_at))
        return tick


###############################################################################
# Replication task: threads ####################################################
###############################################################################

class ReaderCommand(enum.Enum):
    """What the applier asks of the reader thread, which alone touches the channel reader once it runs."""
    ADD = "add"        # start reading a channel
    REMOVE = "remove"  # stop reading it


class Replicator:
    """One running task, three threads:

    - the reader reads the source channels into a bounded queue (``readChanLen`` batches) and, after each read,
      promises how far the replicate channel is read (see ChangeOrder);
    - the catalog thread polls the source's etcd for catalog changes;
    - the applier merges both in the source's order and writes to the target.

    The task owns its threads and stops them on pause, delete and shutdown; the applier, which pins where reading
    starts, asks for the other two through its ApplierContext (``start_reading``).
    """

    FENCE_INTERVAL = 0.05        # seconds between two promises of the replicate channel, at most
    READ_WAIT = 0.25             # seconds a read waits for messages (a channel with a collection ticks every 0.2)
    READ_BATCH_BYTES = 4 << 20   # one batch of the read queue
    CATALOG_SPACING = 0.03       # seconds between two polls of the source's catalog, at least
    CATALOG_IDLE = 0.5           # seconds between two polls when no new tick comes

    def __init__(self, task: TaskInfo, config: ServerConfig, store: TaskStore, clock: TargetClock,
                 on_failure: Callable[["Replicator", str], None], metrics: TaskMetrics,
                 fence: tuple[Lease, str] | None = None, catalog_feed: CatalogFeed | None = None, *,
                 retry: RetryPolicy, tail: KafkaTail | None = None):
        self.task, self.config, self.store, self.clock, self.metrics = task, config, store, clock, metrics
        self.retry = retry
        # the server's (shared by its tasks), or one of the task's own
        self.catalog_feed = catalog_feed or CatalogFeed(config.source, retry)
        self.tail = tail  # the server's, shared by its tasks (Kafka)
        self.fence = fence  # in a cluster: the lease this server holds the task's target with
        self.on_failure = on_failure
        self.stop_event = threading.Event()
        self.read_queue: queue.Queue = queue.Queue(maxsize=config.source.read_chan_len)
        self.catalog_queue: queue.Queue = queue.Queue(maxsize=config.source.read_chan_len)
        self.reader_commands: queue.SimpleQueue = queue.SimpleQueue()
        self.source_clock = SourceClock()
        self.checkpoint = CheckpointRecord()  # the task's durable time: owned there, the applier tells it
        self.waits = Waits()
        self.threads: list[threading.Thread] = []
        self.started = threading.Event()  # set once the start positions are pinned in the meta store
        self.failed = False
        self.failure = ""
        self.refused = False  # the failure is the request's (StartRefused)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn("apply", self._run_applier)

    def start_reading(self, reader: ChannelReader, generations: dict[str, int], poller: CatalogPoller) -> None:
        """The reader and catalog threads, once the applier has pinned where they start (in the meta store):
        from here on the task counts as started."""
        self._spawn("read", self._run_reader, reader, generations)
        self._spawn("catalog", self._run_catalog, poller)
        self.started.set()

    def ask_reader(self, command: ReaderCommand, channel: str, start: StartAt | None, generation: int) -> None:
        self.reader_commands.put((command, channel, start, generation))

    def _spawn(self, role: str, target: Callable, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=f"cdc-{role}-{self.task.task_id[:8]}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the threads; True once they all ended (within ``timeout``)."""
        self._stopping()
        deadline = time.monotonic() + timeout
        joined: set[threading.Thread] = set()
        while unjoined := [t for t in self.threads if t not in joined and t is not threading.current_thread()]:
            for thread in unjoined:  # the applier may still add threads while it stops
                thread.join(max(0.0, deadline - time.monotonic()))
                joined.add(thread)
        return not any(t.is_alive() for t in self.threads if t is not threading.current_thread())

    def alive(self) -> bool:
        """Are all of the task's threads running (once it has started them)?"""
        return not self.stop_event.is_set() and all(t.is_alive() for t in self.threads)

    def lag(self) -> list[dict]:
        channels, _ = self.checkpoint.shown()
        now = time.time()
        return [channel_lag(name, ts, now) for name, ts in sorted(channels.items())]

    def progress(self) -> dict:
        """What `get` shows of a running task: lag per channel, and what it waits on, if anything."""
        shown: dict[str, Any] = {"channels": self.lag()}
        waits = self.faults()
        if waits:
            shown["retrying"] = [w.public() for w in waits]
        _, waiting_for = self.checkpoint.shown()
        if waiting_for:
            shown["waiting_for"] = waiting_for
        return shown

    def faults(self) -> list[Wait]:
        """What the task waits out now: in its own threads, and in its target's ticker (shared with the other
        tasks writing there)."""
        return sorted(self.waits.snapshot() + self.clock.waits.snapshot(), key=lambda w: w.since)

    def patience(self, role: str) -> Patience:
        return Patience(self.retry, self.stop_event, self.waits, role, self.task.task_id)

    def _fail(self, reason: str) -> None:
        if not self.stop_event.is_set():
            self.failed, self.failure = True, reason
            self._stopping()
            log.error("task=%s paused by an error: %s", self.task.task_id, reason)
            # Recorded from a thread of its own: a pause or delete holding the manager's lock may be joining
            # this very thread.
            threading.Thread(target=self.on_failure, args=(self, reason), daemon=True).start()

    def _lose(self, error: LeaseLost) -> None:
        """The target went to another server: stop at once, without a pause (the task goes on there)."""
        if not self.stop_event.is_set():
            self._stopping()
            log.warning("task=%s stops here: %s", self.task.task_id, error)

    def _hand_over(self, target: queue.Queue, item) -> None:
        """Put into a bounded queue, waiting while it is full, until the task stops."""
        while not self.stop_event.is_set():
            try:
                target.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _ending(self, what: str, body: Callable[[], None], closables: list) -> None:
        """Run one thread's body; how it ends decides what becomes of the task: a stop is quiet, a lost lease
        stops it here (it goes on elsewhere), anything else pauses it with the reason. ``closables`` are closed
        at the end, also those the body opened and added to it."""
        try:
            body()
        except TaskStopping:
            pass
        except LeaseLost as exc:
            self._lose(exc)
        except TaskHalt as exc:
            self.refused = isinstance(exc, StartRefused)
            self._fail(str(exc))
        except TargetError as exc:
            self._fail(f"writing to the target: {exc}")
        except Exception as exc:  # noqa: BLE001 - the reason is shown to the user, the trace goes to the log
            log.exception("task=%s %s failed", self.task.task_id, what)
            self._fail(f"{what}: {type(exc).__name__}: {exc}")
        finally:
            for closable in closables:
                with contextlib.suppress(Exception):
                    closable.close()

    # -- reader thread ------------------------------------------------------------------------------------

    def _run_reader(self, reader: ChannelReader, generations: dict[str, int]) -> None:
        self._ending("reading the source MQ", lambda: self._read(reader, generations), [reader])

    def _read(self, reader: ChannelReader, generations: dict[str, int]) -> None:
        """``generations``: of the channels the reader reads already; the reader thread's own from here on."""
        from pymilvus.grpc_gen import common_pb2
        replicate = self.config.source.replicate_chan
        patience = self.patience("reader")
        last_fence, promised = 0.0, 0
        while not self.stop_event.is_set():
            while True:
                try:
                    command, channel, start, generation = self.reader_commands.get_nowait()
                except queue.Empty:
                    break
                if command == ReaderCommand.ADD:
                    patience.run(f"seeking {channel} in the source MQ",
                                 functools.partial(reader.add, channel, start), reader.transient)
                    generations[channel] = generation
                else:
                    reader.remove(channel)
                    generations.pop(channel, None)
            messages = patience.run("reading the source MQ", lambda: reader.read(self.READ_WAIT), reader.transient)
            for message in messages:
                if message.msg_type == common_pb2.TimeTick and message.channel != replicate:
                    if message.timestamp > self.source_clock.tick:
                        self.metrics.reached(Stage.TICK_READ, message.timestamp)
                    self.source_clock.saw_tick(message.timestamp)
            if messages:
                self.metrics.read(collections.Counter(m.channel for m in messages))
            # The end of the replicate channel is asked of the broker only when there is more to promise: after a
            # new tick, or (with none to go by) at the catalog's idle pace.
            spacing = self.CATALOG_IDLE if self.source_clock.standing_in() else self.FENCE_INTERVAL
            if time.monotonic() - last_fence >= spacing and (before := self.source_clock.now()) > promised:
                last_fence = time.monotonic()
                if reader.at_end(replicate):
                    # Read to the end observed after `before` was read: every operation the source
                    # completed before issuing `before` is read.
                    messages.append(SourceMessage(replicate, b"", common_pb2.TimeTick, before, b""))
                    promised = before
            # readChanLen counts batches: each at most READ_BATCH_BYTES, so the buffer's size is bounded too
            batch: list[SourceMessage] = []
            size = 0
            for message in messages:
                batch.append(message)
                size += len(message.payload)
                if size >= self.READ_BATCH_BYTES:
                    self._hand_over(self.read_queue, ReadBatch(dict(generations), batch))
                    batch, size = [], 0
            if batch:
                self._hand_over(self.read_queue, ReadBatch(dict(generations), batch))

    # -- catalog thread -----------------------------------------------------------------------------------

    def _run_catalog(self, poller: CatalogPoller) -> None:
        def poll():
            before = 0
            warned = False
            while not self.stop_event.wait(self.CATALOG_SPACING):
                self.source_clock.wait_past(before, self.CATALOG_IDLE)
                before, asked = self.source_clock.now(), time.monotonic()
                latest = self._next_poll(asked)
                changes = poller.take(latest, self.catalog_feed)
                if latest.source_time[0]:
                    self.source_clock.saw_source_time(*latest.source_time)
                else:  # not a layout this server knows: better this host's clock than operations held for good
                    if not warned:
                        log.warning("task=%s the source's etcd has no %s/%s: with no time tick to go by, this "
                                    "host's clock orders database operations", self.task.task_id,
                                    self.config.source.root_path, SourceMeta.TSO_KEY)
                        warned = True
                    self.source_clock.saw_source_time(time.time() - SourceClock.FALLBACK_AFTER, time.monotonic())
                # Started after `before` was read: every catalog write made before it was issued is here.
                self._hand_over(self.catalog_queue, (before, changes))
                self._wake_applier()
        self._ending("reading the source etcd", poll, [poller.meta])

    def _next_poll(self, asked: float) -> CatalogPoll:
        """The server's next catalog poll that started after ``asked``; while the source's etcd does not answer,
        the wait is shown in `get`, and the task halts past retryTimeout as for any other fault."""
        since, rounds = time.time(), 0
        while (latest := self.catalog_feed.poll_after(asked, 0.5)) is None:
            if self.stop_event.is_set():
                raise TaskStopping()
            error, rounds = self.catalog_feed.error, rounds + 1
            if error:
                self.waits.set("catalog", Wait("reading the source etcd", since, rounds, error))
                if self.retry.expired(since):
                    raise TaskHalt(f"reading the source etcd: {error} (retried for {time.time() - since:.0f}s)")
        self.waits.clear("catalog")
        return latest

    # -- applier thread -----------------------------------------------------------------------------------

    def _run_applier(self) -> None:
        opened: list = []

        def apply():
            # opened inside, so that a failure to open pauses the task with its reason like any other
            opened.append(SourceMeta(self.config.source, self.patience("applier")))
            opened.append(TargetWriter(self.task.connect, self.patience("applier"), self.metrics, self.fence))
            Applier(self._applier_context(*opened)).run()
        try:
            self._ending("applying", apply, opened)
        finally:
            self.clock.leave(self.task.task_id)

    def _applier_context(self, meta: SourceMeta, writer: TargetWriter) -> ApplierContext:
        tid, replication = self.task.task_id, self.config.replication
        outbox = Outbox(writer, tid,
                        lambda pchannel, call: writer.sibling(self.patience(
                            f"sending to {pchannel}" + (f" (call {call + 1})" if call else ""))),
                        replication.calls_per_channel)
        return ApplierContext(
            task=self.task, source=self.config.source, replication=replication, retry=self.retry, meta=meta,
            writer=writer,
            mirror=TargetMirror(writer, tid), outbox=outbox, clock=self.clock, metrics=self.metrics,
            stop=self.stop_event, waits=self.waits, reads=self.read_queue, catalog_reads=self.catalog_queue,
            load_checkpoints=lambda: self.store.load_checkpoints(tid),
            save_checkpoints=lambda checkpoints: self.store.save_checkpoints(tid, checkpoints, fence=self.fence),
            patience=self.patience, ask_reader=self.ask_reader, start_reading=self.start_reading,
            open_reader=lambda: open_channel_reader(self.config.source, self.tail),
            failed=lambda: self.failed, checkpoint=self.checkpoint, wake=self._wake_applier)

    def _stopping(self) -> None:
        """Every thread of the task is to end: the applier, asleep on its read queue, is woken to see it."""
        self.stop_event.set()
        self._wake_applier()

    def _wake_applier(self) -> None:
        """An empty batch in the read queue: the applier waits on that queue alone, and looks at everything
        else each time it wakes. A full queue wakes it anyway."""
        with contextlib.suppress(queue.Full):
            self.read_queue.put_nowait(ReadBatch({}, []))


###############################################################################
# Replication task: collections and their copies ###############################
###############################################################################

class SourceCatalog:
    """What the applier knows of the source's collections: every incarnation it has seen, live or dropped, and
    whether the task replicates it."""

    def __init__(self, meta: SourceMeta, wanted: CollectionFilter):
        self.meta, self.wanted = meta, wanted
        self.known: dict[int, SourceCollection | None] = {}

    def learn(self, collection: SourceCollection) -> None:
        earlier = self.known.get(collection.id)
        if earlier is not None and collection.db_name.startswith(UNKNOWN_DB) and \
                not earlier.db_name.startswith(UNKNOWN_DB):
            # Read by a poll after its database was dropped, by a reader that never saw the database: its name
            # is known from before (a drop of the database must find its collections by that name).
            collection = dataclasses.replace(collection, db_name=earlier.db_name)
        self.known[collection.id] = collection

    def get(self, collection_id: int) -> SourceCollection | None:
        """A replicated collection by id (None for one the task leaves out)."""
        if collection_id not in self.known:
            self.known[collection_id] = self.meta.collection(collection_id)
        found = self.known[collection_id]
        return found if found is not None and self.wanted.matches(found.db_name, found.name) else None

    def named(self, db_name: str, name: str, ts: int) -> SourceCollection | None:
        """The replicated incarnation that had this name at time ``ts``."""
        if not self.wanted.matches(db_name, name):
            return None
        candidates = [c for c in self.known.values() if c is not None and c.db_name == db_name and c.name == name
                      and c.create_time <= ts]
        return max(candidates, key=lambda c: c.create_time) if candidates else None

    def created_at(self, db_name: str, name: str, ts: int) -> SourceCollection | None:
        return next((c for c in self.known.values() if c is not None and c.db_name == db_name and c.name == name
                     and c.create_time == ts), None)


class TargetCopies:
    """Which source collection has which copy on the target, and the steps that make, keep and drop the copies.

    It owns that mapping (and the partitions' one); the catalog and the target's state are read through the
    SourceCatalog, SourceMeta and TargetMirror it is given, and the channels of a copied collection are followed
    through ``follow`` and ``unfollow``.
    """

    def __init__(self, task_id: str, catalog: SourceCatalog, meta: SourceMeta, mirror: TargetMirror,
                 outbox: Outbox, clock: TargetClock, default_partition: str,
                 follow: Callable[[SourceCollection], None], unfollow: Callable[[SourceCollection], None],
                 names: NameMap | None = None):
        self.tid, self.catalog, self.meta, self.mirror, self.outbox = task_id, catalog, meta, mirror, outbox
        self.clock, self.default_partition, self.follow, self.unfollow = clock, default_partition, follow, unfollow
        self.names = names or NameMap()
        # collections whose copy the user made (restored from a backup), to be taken as found: given with start
        # positions at create (set by plan_start, like ``existing``)
        self.restored: Callable[[SourceCollection], bool] = lambda source: False
        # source collection id -> its copy on the target: the mirror's own object, which the mirror keeps current
        self.by_source: dict[int, TargetCollection] = {}
        self.gone: set[int] = set()                         # collections whose drop is applied (or moot)
        self.existing: set[int] = set()                     # copied as they are at start (owned here: plan_start)
        # (target collection id, partition name) -> the source partition id it copies, where known
        self.partitions: dict[tuple[int, str], int] = {}

    def plan_start(self, restored: Callable[[SourceCollection], bool], existing: Iterable[int] = ()) -> None:
        """What the start found: the collections whose copy the user made (``restored``), and those that are
        copied as they are now, their history unread (``existing``, ids)."""
        self.restored, self.existing = restored, set(existing)

    def of(self, collection_id: int) -> tuple[SourceCollection, TargetCollection] | None:
        """A replicated source collection and its copy on the target (made when missing), or None when the task
        leaves it out or its drop is applied."""
        source = self.catalog.get(collection_id)
        if source is None or source.id in self.gone:
            return None
        target = self.by_source.get(source.id)
        if target is not None:
            return source, target
        if source.dropped:
            # Dropped since (the catalog is ahead of the stream): only a copy that exists already still needs
            # what comes before the drop, the drop included.
            target = self.existing_copy(source)
            if target is None:
                return None
            self.adopt(source, target)
            return source, target
        return source, self._make(source)

    def existing_copy(self, source: SourceCollection) -> TargetCollection | None:
        """The copy of a source collection on the target, if there is one (none is made)."""
        target = self.by_source.get(source.id)
        if target is None:
            target = self.mirror.collection(*self.names.collection(source.db_name, source.name), fresh=True)
            if target is None or target.created_ts != source.create_time and not self.restored(source):
                return None
        return target

    def _make(self, source: SourceCollection) -> TargetCollection:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        db_name, name = self.names.collection(source.db_name, source.name)
        target = self.mirror.collection(db_name, name, fresh=True)
        if target is not None and target.created_ts != source.create_time and self.restored(source):
            log.info("task=%s %s on the target is taken as the copy of %s as it stands (restored, created at ts "
                     "%d)", self.tid, target.qualified_name, source.qualified_name, target.created_ts)
            self.adopt(source, target)
            return target
        if target is not None and target.created_ts != source.create_time:
            older = self.catalog.created_at(source.db_name, source.name, target.created_ts)
            if older is not None and older.create_time < source.create_time:
                # The copy of an older incarnation, whose drop the source made before creating this one.
                log.info("task=%s %s on the target is the copy of an older incarnation: dropping it first",
                         self.tid, source.qualified_name)
                self.drop(older, target, source.create_time)
                target = None
            elif target.created_ts > source.create_time:
                raise TaskHalt(f"create collection {source.qualified_name}: the target has a newer collection of "
                               f"that name (created at ts {target.created_ts}) than this source incarnation "
                               f"(ts {source.create_time})")
        if target is None or target.created_ts != source.create_time:
            if db_name != DEFAULT_DB:
                self.mirror.create_database(db_name, source.create_time)
            partitions = [p for p in self.meta.partitions(source.id) if p.state == PARTITION_CREATED]
            request = milvus_pb2.CreateCollectionRequest(
                base=self.mirror.base(common_pb2.CreateCollection, source.create_time),
                db_name=db_name, collection_name=name,
                schema=self._target_schema(source, name).SerializeToString(), shards_num=source.shards_num,
                consistency_level=source.consistency_level,
                properties=[common_pb2.KeyValuePair(key=k, value=v) for k, v in source.properties])
            if source.has_partition_key():
                request.num_partitions = len(partitions)
            created = self.mirror.create_collection(request)
            if created.created_ts != source.create_time:
                raise TaskHalt(f"create collection {source.qualified_name}: the target already has a collection "
                               f"of that name that is not a copy of the source's (created at ts "
                               f"{created.created_ts}, the source's at ts {source.create_time}); drop it on the "
                               f"target or leave it out of the task")
            target = created
            if not source.has_partition_key():
                for partition in partitions:
                    self.partition(target, partition.name, partition.id, partition.created_ts)
            log.info("task=%s created collection %s on the target as %s (source id %d, target id %d)", self.tid,
                     source.qualified_name, target.qualified_name, source.id, target.id)
            self.adopt(source, target)
            if source.id in self.existing:
                self._copy_indexes_and_load(source, target)
            return target
        self.adopt(source, target)
        return target

    def adopt(self, source: SourceCollection, target: TargetCollection) -> None:
        self.by_source[source.id] = target
        self.clock.add_channels(target.pchannels)
        self.follow(source)

    def drop(self, source: SourceCollection, target: TargetCollection, ts: int, msg_id: int = 0) -> None:
        self.mirror.drop_collection(target, ts, MessageRewriter.drop_collection(target, ts, msg_id or ts),
                                    self.outbox)
        log.info("task=%s dropped collection %s on the target", self.tid, source.qualified_name)
        self.forget(source)

    def forget(self, source: SourceCollection) -> None:
        target = self.by_source.pop(source.id, None)
        if target is not None:
            self.partitions = {k: v for k, v in self.partitions.items() if k[0] != target.id}
        self.gone.add(source.id)
        self.unfollow(source)

    def drop_leftover(self, target: TargetCollection, ts: int) -> bool:
        """Drop a target collection that copies a source collection dropped since; False for anything else.

        Milvus writes a collection's drop message to its channels after the drop call returns, so a database
        dropped right after its last collection is dropped comes before that message."""
        db_name, name = self.names.source(target.db_name, target.name)
        source = self.catalog.created_at(db_name, name, target.created_ts)
        if source is None:
            # Its source was dropped and forgotten by the source's etcd while the task was stopped, so its drop
            # message is on channels nobody reads: the source's dropping the database (which it does only once
            # the database is empty) says the copy goes, unless the source has a collection of that name now.
            if any(c.db_name == db_name and c.name == name and not c.dropped for c in self.meta.collections()):
                log.info("task=%s %s stays: it is not the copy of a source collection this task knows (created at "
                         "ts %d)", self.tid, target.qualified_name, target.created_ts)
                return False
            self.mirror.drop_collection(target, ts, MessageRewriter.drop_collection(target, ts, ts), self.outbox)
            log.info("task=%s dropped collection %s on the target: the source dropped it before its database",
                     self.tid, target.qualified_name)
            return True
        now = self.meta.collection(source.id)
        # A source collection is live only in a live database: the source drops a database only once no
        # collection in it is available (dropping ones, or ones whose creation never finished, do not count).
        if now is not None and not now.dropped and now.db_id in self.meta.databases():
            log.info("task=%s %s stays: the source's %s is not dropped", self.tid, target.qualified_name,
                     source.qualified_name)
            return False
        self.drop(source, target, ts)
        return True

    def _copy_indexes_and_load(self, source: SourceCollection, target: TargetCollection) -> None:
        """A collection that existed before the task, whose history the task does not read, comes over as it is
        now: its indexes, and its load state."""
        self.create_indexes(source, target)
        self.sync_load(source, target, hybrid_now())
        log.info("task=%s copied the indexes and load state of existing collection %s", self.tid,
                 source.qualified_name)

    def create_indexes(self, source: SourceCollection, target: TargetCollection) -> None:
        for index in self.meta.indexes(source):
            self.mirror.create_index(target, index.field_name, index.index_name, index.params, index.create_time,
                                     unwanted=self.index_dropped(source))

    def indexes_for_load(self, source: SourceCollection, target: TargetCollection) -> None:
        """A load refused for want of an index: the source's indexes, as they are now. When the source has none
        any more, it dropped them after the load being copied, and so released the collection before (Milvus
        drops no index of a loaded collection): that release, or the drop, comes later in its history."""
        if not self.meta.indexes(source):
            raise Undone(f"the source's {source.qualified_name} has no index any more, so it was released since")
        self.create_indexes(source, target)

    def index_dropped(self, source: SourceCollection) -> Callable[[str], bool]:
        return lambda name: name not in {i.index_name for i in self.meta.indexes(source)}

    def sync_load(self, source: SourceCollection, target: TargetCollection, ts: int) -> None:
        """Bring the copy's load state to the source's, as it is now."""
        state = self.meta.load_state(source.id)
        wanted = None
        if state is not None:
            names = {p.id: p.name for p in self.meta.partitions(source.id) if p.state == PARTITION_CREATED}
            loaded = frozenset(names[p] for p in state.partition_ids if p in names)
            ids = {name: pid for pid, name in names.items()}
            for name in loaded:
                self.partition(target, name, ids[name], ts)
            wanted = WantedLoad(state.load_type == LOAD_TYPE_COLLECTION, state.replicas, loaded,
                                source.has_partition_key())
        self.mirror.set_load(target, wanted, ts, create_indexes=lambda: self.indexes_for_load(source, target))

    def partition(self, target: TargetCollection, name: str, source_id: int, ts: int) -> int:
        """The target partition that copies source partition ``source_id`` named ``name``, made when missing.

        A partition's drop message, like a collection's, is written after the drop call returns: a partition
        made again under the same name right away may come first. The target's partition of that name is then
        the copy of the dropped one, and goes first."""
        key = (target.id, name)
        if name in target.partitions:
            copied = self.partitions.setdefault(key, source_id)
            if copied == source_id or name == self.default_partition:
                return target.partitions[name]
            log.info("task=%s partition %s/%s on the target is the copy of a dropped one: dropping it first",
                     self.tid, target.qualified_name, name)
            self.drop_partition(target, name, ts, ts)
        self.partitions[key] = source_id
        return self.mirror.ensure_partition(target, name, ts)

    def holds_partition(self, target: TargetCollection, name: str, source_id: int) -> bool:
        """Is the target's partition of this name (still) the copy of source partition ``source_id``?"""
        return name in target.partitions and self.partitions.setdefault((target.id, name), source_id) == source_id

    def drop_partition(self, target: TargetCollection, name: str, ts: int, msg_id: int) -> None:
        self.mirror.drop_partition(target, name, ts, self.outbox,
                                   MessageRewriter.drop_partition(target, name, ts, msg_id))
        self.partitions.pop((target.id, name), None)
        log.info("task=%s dropped partition %s/%s on the target", self.tid, target.qualified_name, name)

    @staticmethod
    def _target_schema(source: SourceCollection, name: str):
        from pymilvus.grpc_gen import schema_pb2
        schema = schema_pb2.CollectionSchema()
        schema.CopyFrom(source.schema)
        schema.name = name  # the target checks it against the collection's name, which a name mapping changes
        del schema.fields[:]
        schema.fields.extend(f for f in source.schema.fields if not f.is_dynamic)
        return schema


###############################################################################
# Replication task: the applier ################################################
###############################################################################

CATALOG_INPUT = "source catalog (etcd)"


@dataclass(frozen=True)
class ApplierContext:
    """All the applier is given: what it reads, what it writes, and what it may ask of its task. The Replicator
    builds it and owns what is behind it, its threads above all; a unit test builds one of fakes."""
    task: TaskInfo
    source: SourceSettings
    replication: ReplicationSettings
    retry: RetryPolicy               # the server's one retry policy
    meta: SourceMeta                 # the source's catalog, read
    writer: TargetWriter             # the target: written through the mirror (DDL) and the outbox (messages)
    mirror: TargetMirror
    outbox: Outbox
    clock: TargetClock               # the target's ticks: joined at start, advanced with the checkpoint
    metrics: TaskMetrics
    stop: threading.Event            # set when the task stops
    waits: Waits                     # what `get` shows the task waiting out
    reads: queue.Queue               # ReadBatch after ReadBatch, from the reader thread
    catalog_reads: queue.Queue       # (fence, catalog changes), from the catalog thread
    load_checkpoints: Callable[[], dict[str, Checkpoint]]
    save_checkpoints: Callable[[list[Checkpoint]], None]   # fenced, in a cluster
    patience: Callable[[str], Patience]                     # for one role's retries, shown in `get`
    # the reader thread alone touches the channel reader once it runs: channels are added and removed through it
    ask_reader: Callable[[ReaderCommand, str, StartAt | None, int], None]
    # the reader and catalog threads (the task's, not the applier's), once their starts are pinned
    start_reading: Callable[[ChannelReader, dict[str, int], CatalogPoller], None]
    open_reader: Callable[[], ChannelReader]  # the task's reader of the source MQ (sharing the server's tail)
    failed: Callable[[], bool]       # the task is pausing for an error: its last checkpoint stands
    checkpoint: CheckpointRecord     # the task's durable time: told at each checkpoint stored
    # wakes the applier waiting on ``reads``: the catalog thread, a call's answer and a stop each call it
    wake: Callable[[], None] = lambda: None


@dataclass
class SentRound:
    """A round whose messages are on their way to the target: committed once every future is done."""
    sent: list[concurrent.futures.Future]
    done: list[int]   # the seqs of its changes
    upto: int
    size: int         # bytes of its messages


class Applier:
    """The applier thread: takes the task's changes in ChangeOrder's order and applies each with its handler.

    It owns the order, what it knows of the source (SourceCatalog), which source collection has which copy on
    the target, the channels it follows, and when a checkpoint is stored (the durable time itself is held by the
    task's CheckpointRecord). The target's side is TargetMirror's. All else it is given in an ApplierContext: it
    starts no thread, and asks the reader for channels through it.
    """

    WRITE_AHEAD_BYTES = 16 << 20  # messages on their way to the target before the oldest round must be acknowledged
    ROUND_BYTES = 4 << 20         # messages one round hands to the send lanes, at most
    HELD_BYTES = 64 << 20         # messages waiting above the watermark before the read queue is left be
    LAST_TICK_WAIT = 5.0          # seconds a stopping task waits for its last tick to go out
    IDLE_WAIT = 1.0               # seconds the applier sleeps with nothing read (a wake ends it sooner)
    HELD_WAIT = 0.05              # seconds between two looks at the catalog while it alone holds the order

    def __init__(self, ctx: ApplierContext):
        from pymilvus.grpc_gen import common_pb2
        self.ctx = ctx
        self.meta, self.writer, self.mirror, self.outbox = ctx.meta, ctx.writer, ctx.mirror, ctx.outbox
        self.task, self.stop = ctx.task, ctx.stop
        self.tid = self.task.task_id
        self.filter = self.task.filter
        self.settings = ctx.source
        self.replicate_chan = self.settings.replicate_chan
        self.catalog = SourceCatalog(ctx.meta, self.filter)
        self.names = self.task.names
        self.copies = TargetCopies(self.tid, self.catalog, ctx.meta, self.mirror, self.outbox, ctx.clock,
                                   self.settings.default_partition_name, self._follow, self._unfollow, self.names)
        # Start positions given at create: a channel's messages at or below its time are on the target already;
        # for one collection (by name), only that collection's.
        self.floors: dict[tuple[str, str], int] = {(p.channel, p.collection): p.timestamp
                                                   for p in self.task.start_positions}
        self.order = ChangeOrder()
        self.followed: dict[int, SourceCollection] = {}        # collections whose channels are read
        self.generations: dict[str, int] = {}   # times each channel was added as an input (ChangeOrder's stale check)
        self.catalog_fence = 0
        self.last_checkpoint = 0.0
        self.checkpoint_dirty = False
        self.sent: collections.deque[SentRound] = collections.deque()  # rounds handed to the send lanes
        self.write_ahead = ctx.replication.write_ahead
        self.store_retry_at: float | None = None   # the meta store is down: when to try it again
        self.store_failures: list[float] = []
        self.reached: dict[Stage, int] = {}   # the source time each stage last moved to (the stage-lag metric)
        self.data_handlers = {
            common_pb2.Insert: self.on_insert, common_pb2.Delete: self.on_delete,
            common_pb2.CreateCollection: self.on_create_collection,
            common_pb2.DropCollection: self.on_drop_collection, common_pb2.DropPartition: self.on_drop_partition}
        self.operation_handlers = {
            common_pb2.CreateDatabase: self.on_create_database, common_pb2.DropDatabase: self.on_drop_database,
            common_pb2.CreateIndex: self.on_create_index, common_pb2.DropIndex: self.on_drop_index,
            common_pb2.LoadCollection: self.on_load, common_pb2.ReleaseCollection: self.on_load,
            common_pb2.LoadPartitions: self.on_load, common_pb2.ReleasePartitions: self.on_load,
            common_pb2.Flush: self.on_flush}
        self.catalog_handlers = {
            CatalogChangeKind.COLLECTION: self.on_collection_seen, CatalogChangeKind.PARTITION: self.on_partition_seen,
            CatalogChangeKind.LOAD: self.on_load_changed, CatalogChangeKind.DROPPED: self.on_dropped_while_stopped}

    @property
    def durable(self) -> int:
        """The time of the task's last checkpoint: asked of its CheckpointRecord, the one that holds it."""
        return self.ctx.checkpoint.ts

    # -- start ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        saved = self._with_store("loading the checkpoints from the meta store",
                                 self.ctx.load_checkpoints)
        self.ctx.checkpoint.resumed(max((c.timestamp for c in saved.values()), default=0))
        self.order.resume_at(self.durable)
        self.catalog_fence = self.durable
        self.ctx.clock.join(self.tid, lambda: self.ctx.checkpoint.ts, self.task.connect)
        self.ctx.clock.add_channels(self.mirror.pchannels())
        reader = self.ctx.open_reader()
        try:
            poller, starts = self._plan_starts(saved, reader)
            for name, start in starts.items():
                self._read(name, start, reader, saved[name].applied if name in saved else ())
        except BaseException:
            reader.close()
            raise
        # Pinned before create answers: what the user does next is replicated, even across a crash.
        self.checkpoint_dirty = True
        self._with_store("saving the start positions to the meta store",
                         lambda: self._save_checkpoint(force=True, strict=True))
        log.info("task=%s started: %d collection(s), %d channel(s), resuming at ts %d", self.tid,
                 len(self.followed), len(self.order.names()) - 1, self.durable)
        self.ctx.start_reading(reader, dict(self.generations), poller)
        try:
            self._loop()
        finally:
            if not self.outbox.close(self.writer.call_timeout + 5):
                log.warning("task=%s stopping with a call to the target still out after %.0fs", self.tid,
                            self.writer.call_timeout + 5)
            if not self.ctx.failed():
                try:
                    self._save_checkpoint(force=True)
                except MetaStoreUnavailable as exc:  # the last stored checkpoint stands: nothing is lost
                    log.warning("task=%s stopping without a last checkpoint: %s", self.tid, exc)
            self._last_tick()

    def _last_tick(self) -> None:
        """Tick the target up to the last checkpoint before the task leaves its clock. A Milvus 2.3 datanode
        starts to follow a new collection's channel only once a tick passes the collection's creation, and
        until then it follows no other new collection either (its flushes answer "channel not found"): a task
        paused or deleted right after it made a collection would leave the whole target so, with nobody to
        tick it."""
        self.ctx.clock.advance(self.tid)
        if not self.ctx.clock.wait_ticked(self.durable, self.LAST_TICK_WAIT):
            log.warning("task=%s stopping before the target was ticked to the last checkpoint (ts %d)", self.tid,
                        self.durable)

    def _plan_starts(self, saved: dict[str, Checkpoint], reader: ChannelReader) \
            -> tuple[CatalogPoller, dict[str, StartAt]]:
        """Where each channel starts, and the catalog poller that continues from the listing.

        A channel with a checkpoint resumes there. Otherwise a fresh task starts at the start positions given at
        create, else at the latest offsets, pinned before the collections are listed, so that nothing created
        meanwhile slips between listing and reading; a collection that is new since then (or since the last
        checkpoint, or any collection when replay_existing is set, or one given use_start_position) starts at its
        own start position.
        """
        fresh = not saved and not self.task.replay_existing
        before = [c for c in self.meta.collections() if not c.dropped and self.filter.matches(c.db_name, c.name)]
        pins: dict[str, StartAt] = {}
        if fresh:
            given = self._given_starts(before, reader)
            for channel in {self.replicate_chan} | {p for c in before for p in c.pchannels}:
                pins[channel] = given.get(channel) or reader.resolve(channel, LATEST)
        from pymilvus.client.utils import mkts_from_unixtime
        created = mkts_from_unixtime(self.task.created_at)
        old = {c.id for c in before}
        self.copies.plan_start(restored=lambda c: c.create_time < created and self._given_start(c) is not None,
                               existing=old if fresh else ())
        if not saved:
            for db_name in sorted(set(self.meta.databases().values())):
                if self.filter.covers_database(db_name) and self.names.database(db_name) != DEFAULT_DB:
                    self.mirror.create_database(self.names.database(db_name), hybrid_now())
        revision = self.meta.revision()
        listed = self.meta.collections(revision)
        for collection in listed:
            self.catalog.learn(collection)
        live = [c for c in listed if not c.dropped and self.filter.matches(c.db_name, c.name)]
        self.order.add_input(CATALOG_INPUT, InputKind.CATALOG)
        for collection in live:
            self.order.offer(CATALOG_INPUT, collection.create_time,
                             CatalogChange(CatalogChangeKind.COLLECTION, collection.id, collection.create_time,
                                           collection=collection))
            if saved:  # partitions made and load changes while the task was stopped: no message carries them
                for partition in self.meta.partitions(collection.id):
                    if partition.state == PARTITION_CREATED and partition.created_ts > self.durable:
                        self.order.offer(CATALOG_INPUT, partition.created_ts, CatalogChange(
                            CatalogChangeKind.PARTITION, collection.id, partition.created_ts, partition=partition))
                self.order.offer(CATALOG_INPUT, self.durable + 1,
                                 CatalogChange(CatalogChangeKind.LOAD, collection.id))

        if saved:
            # Dropped while the task was stopped: the drop message is on the collection's channels, which are not
            # read when no live collection needs them (and the source no longer ticks them). A copy is dropped
            # right after the checkpoint's time instead (what came before the drop goes with it), or right after
            # its creation when that is later (the target ignores a drop older than the collection).
            for collection in listed:
                if collection.dropped and self.filter.matches(collection.db_name, collection.name):
                    ts = max(self.durable, collection.create_time) + 1
                    self.order.offer(CATALOG_INPUT, ts, CatalogChange(CatalogChangeKind.DROPPED, collection.id, ts,
                                                                      collection=collection))

        def resumed(channel: str) -> StartAt | None:
            checkpoint = saved.get(channel)
            return StartAt(checkpoint.resume, checkpoint.msg_id) if checkpoint else None

        replayed = self.task.replayed
        starts = {self.replicate_chan: resumed(self.replicate_chan) or pins.get(self.replicate_chan) or EARLIEST}
        for channel in sorted({p for c in live for p in c.pchannels}):
            if start := resumed(channel):
                starts[channel] = start
                continue
            newcomers = [c for c in live if channel in c.pchannels and (not fresh or c.id not in old
                                                                         or replayed.matches(c.db_name, c.name))]
            ids = [c.start_positions[channel] for c in newcomers if channel in c.start_positions]
            if channel in pins and pins[channel].kind == StartKind.AT:
                ids.append(pins[channel].msg_id)
            starts[channel] = StartAt(StartKind.AT, reader.earliest(ids)) if ids else pins.get(channel, LATEST)
        for collection in live:
            self.followed[collection.id] = collection
        return CatalogPoller(SourceMeta(self.settings, self.ctx.patience("catalog")), revision), starts

    def _given_start(self, collection: SourceCollection, channel: str = "") -> StartPosition | None:
        """The start position given at create that covers this collection (on ``channel``, or on any of its)."""
        return next((p for p in self.task.start_positions if (p.channel == channel if channel else
                     p.channel in collection.pchannels) and p.collection in ("", collection.qualified_name)), None)

    def _given_starts(self, before: list[SourceCollection], reader: ChannelReader) -> dict[str, StartAt]:
        """Where each channel with start positions given at create starts: at the earliest of them. Every
        collection the task replicates on such a channel needs a position there, and one later than the earliest
        needs its time, by which the messages before it are skipped; else the task cannot start exactly."""
        found: dict[str, StartAt] = {}
        for channel in sorted({p.channel for p in self.task.start_positions}):
            here = [p for p in self.task.start_positions if p.channel == channel]
            first = reader.earliest([p.msg_id for p in here])
            found[channel] = StartAt(StartKind.AT, first)
            for collection in before:
                if channel not in collection.pchannels:
                    continue
                own = self._given_start(collection, channel)
                if own is None:
                    raise StartRefused(f"collection {collection.qualified_name} is on source channel {channel}, "
                                       f"where another collection starts at a position given at create, and has "
                                       f"no position of its own: give it one too, or replicate it in another task")
                if own.msg_id != first and not own.timestamp:
                    raise StartRefused(f"the start positions given for source channel {channel} differ, and the one "
                                       f"of {collection.qualified_name} has no time to skip the earlier messages by: "
                                       f"give positions as `position` answers them, or use separate tasks")
        return found

    def _read(self, channel: str, start: StartAt, reader: ChannelReader | None = None,
              applied: Iterable[bytes] = ()) -> None:
        """Start reading a channel as one more input of the order; ``applied``: what its checkpoint says is
        applied after ``start``."""
        generation = self.generations[channel] = self.generations.get(channel, 0) + 1
        if reader is not None:
            start = reader.add(channel, start)  # at start-up, before the reader thread owns the reader
        else:
            self.ctx.ask_reader(ReaderCommand.ADD, channel, start, generation)
        kind = InputKind.OPERATIONS if channel == self.replicate_chan else InputKind.DATA
        self.order.add_input(channel, kind, start if start.kind in (StartKind.AFTER, StartKind.AT) else None,
                             skip_until=self.floors.get((channel, ""), 0), generation=generation,
                             durable=self.durable, skip_positions=applied)
        log.info("task=%s reading %s from %s", self.tid, channel,
                 start.kind if not start.msg_id else f"{start.kind} {start.msg_id.hex()}")

    def _unread(self, channel: str) -> None:
        if self.order.has_input(channel):
            self.order.remove_input(channel)
            self.ctx.ask_reader(ReaderCommand.REMOVE, channel, None, 0)
            log.info("task=%s stopped reading %s: no replicated collection left on it", self.tid, channel)

    # -- main loop ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stop.is_set():
            if self.store_retry_at is not None:
                # The meta store is down: nothing moves until the checkpoint is stored (the target is never
                # ticked past it, so nothing is lost), and the task keeps running.
                if time.monotonic() < self.store_retry_at:
                    self.stop.wait(0.05)
                    continue
                if not self._save_checkpoint(now=True):
                    continue
            self._step()

    def _step(self) -> None:
        self._receive()
        barrier = self._round()
        if barrier:
            self._commit_sent(until_empty=True)
        # Caught up (no round out, nothing read waiting): the checkpoint goes out at once, and the target's tick
        # right after it, so rows are visible as soon as it is safe. Under load, once per checkpointInterval.
        self._save_checkpoint(now=barrier or (not self.sent and self.ctx.reads.empty()))

    def _receive(self) -> None:
        from pymilvus.grpc_gen import common_pb2
        batch = ReadBatch({}, [])
        if self.order.held_bytes > self.HELD_BYTES and self.order.held_by_only(InputKind.CATALOG):
            # The source's etcd is silent and changes pile up behind it: leave the read queue be, so that the
            # reader waits on it instead of memory growing. Only the catalog can free them, and it comes through
            # its own queue (a DML or replicate channel holding back could not: its promise is in the read queue).
            self.stop.wait(self.HELD_WAIT)
        else:
            # Whatever the applier waits for wakes it through the read queue (ApplierContext.wake): it sleeps
            # between two ticks of the source instead of polling.
            with contextlib.suppress(queue.Empty):
                batch = self.ctx.reads.get(timeout=self.IDLE_WAIT)
        for message in batch.messages:
            generation = batch.generations.get(message.channel, 0)
            if message.msg_type == common_pb2.TimeTick:
                self.order.promise(message.channel, message.timestamp, message.msg_id, generation)
                if message.channel == self.replicate_chan:
                    self._reached(Stage.OPERATIONS_PROMISED, message.timestamp)
                continue
            self.order.offer(message.channel, message.timestamp, message, message.msg_id, generation)
            if message.msg_type == common_pb2.DropCollection and self.order.has_input(message.channel) and \
                    self._last_on_channel(message):
                # The source stops ticking a channel with no collection left, possibly before a tick passes the
                # drop; nothing can follow the drop there, so it stands for the channel's final tick.
                self.order.promise(message.channel, message.timestamp, generation=generation)
        while True:
            try:
                fence, changes = self.ctx.catalog_reads.get_nowait()
            except queue.Empty:
                return
            for change in changes:
                self._accept_catalog(change)
            self.catalog_fence = fence
            self.order.promise(CATALOG_INPUT, fence)
            self._reached(Stage.CATALOG_PROMISED, fence)

    def _reached(self, stage: Stage, ts: int) -> None:
        if ts > self.reached.get(stage, 0):
            self.reached[stage] = ts
            self.ctx.metrics.reached(stage, ts)

    def _last_on_channel(self, message: SourceMessage) -> bool:
        from pymilvus.grpc_gen import msg_pb2
        dropped = msg_pb2.DropCollectionRequest.FromString(message.payload).collectionID
        return message.channel not in self.meta.live_pchannels(excluding=dropped)

    def _accept_catalog(self, change: CatalogChange) -> None:
        if change.kind == CatalogChangeKind.COLLECTION:
            collection = change.collection
            assert collection is not None  # a COLLECTION change carries its collection
            self.catalog.learn(collection)  # what it is now; its creation is applied in order
            if collection.state in (COLLECTION_CREATED, COLLECTION_CREATING) and \
                    self.filter.matches(collection.db_name, collection.name):
                self.order.offer(CATALOG_INPUT, collection.create_time, change)
        elif change.kind == CatalogChangeKind.PARTITION:
            assert change.partition is not None  # a PARTITION change carries its partition
            if change.partition.state == PARTITION_CREATED and self.catalog.get(change.collection_id):
                self.order.offer(CATALOG_INPUT, change.ts, change)
        elif self.catalog.get(change.collection_id):
            # Load state has no source time: it changed after the previous poll's fence was read, so it goes
            # right after that fence, before anything the source did after the change.
            self.order.offer(CATALOG_INPUT, self.catalog_fence + 1, change)

    def _round(self) -> bool:
        """Apply what is ready, in order, and hand the outbox to the send lanes; the round is committed once its
        messages are on the target (``_commit_sent``), up to ``writeAhead`` rounds later. True when the round
        stopped at a flush, which must wait until what comes before it is durable and ticked."""
        from pymilvus.grpc_gen import common_pb2
        ready, watermark = self.order.take()
        self._reached(Stage.ORDERED, watermark)
        done: list[Change] = []
        barrier = False
        for change in ready:
            if self.stop.is_set():
                raise TaskStopping()
            if (done or self.sent or self.durable < self.order.applied) and change.kind == InputKind.OPERATIONS \
                    and change.item.msg_type == common_pb2.Flush:
                # The target flushes a channel only once its datanode watches it, which takes a first tick
                # after the collection's creation: a collection made in this round has had none yet.
                barrier = True
                break
            if change.kind == InputKind.CATALOG:
                self.catalog_handlers[change.item.kind](change.item, change.ts)
            else:
                handlers = self.data_handlers if change.kind == InputKind.DATA else self.operation_handlers
                handler = handlers.get(change.item.msg_type)
                if handler is not None:
                    handler(change.item)
                elif change.item.msg_type != common_pb2.TimeTick:
                    log.debug("task=%s skipped message type %d of %s", self.tid, change.item.msg_type,
                              change.input)
            done.append(change)
            if self.order.added:
                break  # a channel was added: what is still ready must wait for its promise
            if self.outbox.size >= self.ROUND_BYTES:
                break  # enough for one round: the rest is taken by the next
        if len(done) == len(ready):
            upto = watermark
        elif barrier:
            upto = ready[len(done)].ts - 1  # everything before the flush
        else:  # broken off (a channel added, a full round): only below the last change applied is all applied
            upto = done[-1].ts - 1
        if done or upto > (self.sent[-1].upto if self.sent else self.order.applied):
            size = self.outbox.size
            futures = self.outbox.send()
            for future in futures:
                future.add_done_callback(lambda _: self.ctx.wake())  # the answer lets the checkpoint move on
            self.sent.append(SentRound(futures, self.order.hand_out(done), upto, size))
            self._reached(Stage.SENT, upto)
        self._commit_sent(until_empty=False)
        return barrier

    def _commit_sent(self, until_empty: bool) -> None:
        """Commit, oldest first, the rounds whose messages the target has taken; wait for the oldest while more
        than ``writeAhead`` are out (or for all of them). A failed send is raised here."""
        while self.sent:
            oldest = self.sent[0]
            over = len(self.sent) > self.write_ahead or sum(r.size for r in self.sent) > self.WRITE_AHEAD_BYTES
            if not (until_empty or over) and not all(f.done() for f in oldest.sent):
                return
            for future in oldest.sent:
                future.result()
            self.sent.popleft()
            self.order.commit(oldest.done, oldest.upto)
            self._reached(Stage.ACKNOWLEDGED, oldest.upto)
            self.checkpoint_dirty = True

    def _save_checkpoint(self, force: bool = False, now: bool = False, strict: bool = False) -> bool:
        """Persist the checkpoints (at most once per checkpointInterval unless ``now``), then tick the target up
        to them; ``force`` persists without ticking (at start and at stop). False when the meta store did not
        answer: the next try is scheduled (``strict`` raises instead)."""
        started = time.monotonic()
        if not self.checkpoint_dirty or (not force and not now and started - self.last_checkpoint <
                                         self.ctx.replication.checkpoint_interval):
            return True
        applied = self.order.applied
        checkpoints = []
        for name in self.order.names():
            resume = self.order.resume(name) if name != CATALOG_INPUT else None
            if resume is not None:
                checkpoints.append(Checkpoint(name, resume.msg_id, applied, resume.kind,
                                              self.order.applied_after_resume(name)))
        try:
            self.ctx.save_checkpoints(checkpoints)
        except MetaStoreUnavailable as exc:
            if strict or force:
                raise
            self._store_down(exc)
            return False
        if self.store_retry_at is not None:
            log.info("task=%s the meta store answers again: checkpoint stored", self.tid)
            self.store_retry_at, self.store_failures = None, []
            self.ctx.waits.clear("checkpoint")
        self.ctx.checkpoint.stored(applied, [name for name in self.order.names() if name != CATALOG_INPUT],
                                   self.order.holding())
        self.checkpoint_dirty, self.last_checkpoint = False, started
        self._reached(Stage.CHECKPOINTED, applied)
        log.debug("task=%s checkpoint at ts %d (%.3fs behind)", self.tid, applied, time.time() - ts_seconds(applied))
        if not force:
            self.ctx.clock.advance(self.tid)
        return True

    def _with_store(self, operation: str, call: Callable[[], Any]) -> Any:
        """A meta store call at start, waited for as long as the store is away (it never pauses a task: the
        pause would have to be stored there), with the wait shown in `get`."""
        started, tries = time.time(), 0
        while True:
            try:
                result = call()
            except MetaStoreUnavailable as exc:
                tries += 1
                self.ctx.waits.set("checkpoint", Wait(operation, started, tries, str(exc)))
                log.warning("task=%s %s: %s", self.tid, operation, exc)
                if self.stop.wait(self.ctx.retry.delay(tries)):
                    raise TaskStopping() from None
                continue
            self.ctx.waits.clear("checkpoint")
            return result

    def _store_down(self, error: MetaStoreUnavailable) -> None:
        self.store_failures.append(time.time())
        backoff = self.ctx.retry.delay(len(self.store_failures))
        self.store_retry_at = time.monotonic() + backoff
        self.ctx.waits.set("checkpoint", Wait("saving the checkpoint to the meta store", self.store_failures[0],
                                              len(self.store_failures), str(error)))
        log.warning("task=%s %s; trying again in %.1fs", self.tid, error, backoff)

    def _follow(self, source: SourceCollection) -> None:
        """Read the channels of a collection that has a copy on the target, until its drop is applied."""
        self.followed[source.id] = source
        for pchannel in source.pchannels:
            if not self.order.has_input(pchannel):
                start = source.start_positions.get(pchannel)
                self._read(pchannel, StartAt(StartKind.AT, start) if start else LATEST)

    def _unfollow(self, source: SourceCollection) -> None:
        """Stop reading the channels no followed collection needs any more."""
        self.followed.pop(source.id, None)
        needed = {p for c in self.followed.values() for p in c.pchannels}
        for pchannel in source.pchannels:
            if pchannel not in needed:
                self._unread(pchannel)

    # -- data channel handlers --------------------------------------------------------------------------------

    def _restored(self, message: SourceMessage, source: SourceCollection) -> bool:
        """Is this message of the collection on the target already, by the start position given for it?"""
        return bool(self.floors) and message.timestamp <= self.floors.get((message.channel, source.qualified_name), 0)

    def on_insert(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import msg_pb2
        msg = msg_pb2.InsertRequest.FromString(message.payload)
        copy = self.copies.of(msg.collectionID)
        if copy is None or self._restored(message, copy[0]):
            return
        _, target = copy
        partition_id = self.copies.partition(target, msg.partition_name, msg.partitionID, message.timestamp)
        shard = shard_index(msg.shardName)
        self.outbox.add(target.pchannels[shard], MessageRewriter.insert(msg, target, partition_id, shard),
                        reorderable=True)
        self.ctx.metrics.replicated(target.qualified_name, "insert", msg.num_rows or len(msg.timestamps),
                                    len(message.payload))

    def on_delete(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import msg_pb2
        msg = msg_pb2.DeleteRequest.FromString(message.payload)
        copy = self.copies.of(msg.collectionID)
        if copy is None or self._restored(message, copy[0]):
            return
        _, target = copy
        partition_id = -1
        if msg.partitionID not in (0, -1) and msg.partition_name:
            partition_id = self.copies.partition(target, msg.partition_name, msg.partitionID, message.timestamp)
        shard = shard_index(msg.shardName)
        self.outbox.add(target.pchannels[shard], MessageRewriter.delete(msg, target, partition_id, shard),
                        reorderable=True)
        self.ctx.metrics.replicated(target.qualified_name, "delete", msg.num_rows or len(msg.timestamps),
                                    len(message.payload))

    def on_create_collection(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import msg_pb2
        self.copies.of(msg_pb2.CreateCollectionRequest.FromString(message.payload).collectionID)

    def on_drop_collection(self, message: SourceMessage) -> None:
        """Every channel of the collection carries its drop at the same time; the first one read applies it
        (the order has delivered everything before it from every channel), the others find it gone."""
        from pymilvus.grpc_gen import common_pb2, msg_pb2
        msg = msg_pb2.DropCollectionRequest.FromString(message.payload)
        source = self.catalog.get(msg.collectionID)
        if source is None or source.id in self.copies.gone or self._restored(message, source):
            return
        target = self.copies.existing_copy(source)
        if target is None:
            self.copies.forget(source)
            return
        self.copies.drop(source, target, message.timestamp,
                         common_pb2.MsgHeader.FromString(message.payload).base.msgID)

    def on_drop_partition(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import common_pb2, msg_pb2
        msg = msg_pb2.DropPartitionRequest.FromString(message.payload)
        copy = self.copies.of(msg.collectionID)
        if copy is None or self._restored(message, copy[0]):
            return
        _, target = copy
        if not self.copies.holds_partition(target, msg.partition_name, msg.partitionID):
            return  # dropped already (a replay), or the name holds a newer incarnation already
        self.copies.drop_partition(target, msg.partition_name, message.timestamp,
                                   common_pb2.MsgHeader.FromString(message.payload).base.msgID or message.timestamp)

    # -- replicate channel handlers ---------------------------------------------------------------------------

    def _operation(self, message: SourceMessage, cls):
        request = cls.FromString(message.payload)
        return request, request.db_name or DEFAULT_DB

    def on_create_database(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import milvus_pb2
        request, db_name = self._operation(message, milvus_pb2.CreateDatabaseRequest)
        if self.filter.covers_database(db_name):
            self.mirror.create_database(self.names.database(db_name), message.timestamp)

    def on_drop_database(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import milvus_pb2
        request, db_name = self._operation(message, milvus_pb2.DropDatabaseRequest)
        if self.filter.covers_database(db_name):
            self.outbox.flush()
            self.mirror.drop_database(self.names.database(db_name), message.timestamp, self.copies.drop_leftover)

    def _copy_named(self, db_name: str, name: str, ts: int) -> tuple[SourceCollection, TargetCollection] | None:
        source = self.catalog.named(db_name, name, ts)
        return self.copies.of(source.id) if source is not None else None

    def on_create_index(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import milvus_pb2
        request, db_name = self._operation(message, milvus_pb2.CreateIndexRequest)
        copy = self._copy_named(db_name, request.collection_name, message.timestamp)
        if copy is None:
            return
        source, target = copy
        # Milvus 2.3.5 writes the request with an empty index name and names the index after its field; the
        # source's catalog has the name it chose (also once the index is dropped again). Never leave it empty:
        # each Milvus would choose its own, and a later drop by the source's name would miss the target's.
        name = request.index_name or index_made_at(self.meta.indexes(source, dropped=True), request.field_name,
                                                   message.timestamp)
        self.outbox.flush()
        self.mirror.create_index(target, request.field_name, name, [(p.key, p.value) for p in request.extra_params],
                                 message.timestamp, unwanted=self.copies.index_dropped(source))
        log.info("task=%s created index %s of %s", self.tid, name or request.field_name, source.qualified_name)

    def on_drop_index(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import milvus_pb2
        request, db_name = self._operation(message, milvus_pb2.DropIndexRequest)
        copy = self._copy_named(db_name, request.collection_name, message.timestamp)
        if copy is None:
            return
        source, target = copy
        self.outbox.flush()
        self.mirror.drop_index(target, request.field_name, request.index_name, message.timestamp)
        log.info("task=%s dropped index %s of %s", self.tid, request.index_name or request.field_name,
                 source.qualified_name)

    def on_load(self, message: SourceMessage) -> None:
        """Load and release, of a collection or of partitions: the copy follows the source's load state."""
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        request, db_name = self._operation(message, {
            common_pb2.LoadCollection: milvus_pb2.LoadCollectionRequest,
            common_pb2.ReleaseCollection: milvus_pb2.ReleaseCollectionRequest,
            common_pb2.LoadPartitions: milvus_pb2.LoadPartitionsRequest,
            common_pb2.ReleasePartitions: milvus_pb2.ReleasePartitionsRequest}[message.msg_type])
        copy = self._copy_named(db_name, request.collection_name, message.timestamp)
        if copy is not None:
            self.outbox.flush()
            self.copies.sync_load(*copy, message.timestamp)

    def on_flush(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import milvus_pb2
        request, db_name = self._operation(message, milvus_pb2.FlushRequest)
        names = [name for name in request.collection_names
                 if self._copy_named(db_name, name, message.timestamp) is not None]
        if names:
            self.outbox.flush()
            self.mirror.flush(self.names.database(db_name), [self.names.collection(db_name, n)[1] for n in names],
                              message.timestamp)

    # -- catalog handlers -------------------------------------------------------------------------------------

    def on_collection_seen(self, change: CatalogChange, ts: int) -> None:
        self.copies.of(change.collection_id)

    def on_partition_seen(self, change: CatalogChange, ts: int) -> None:
        copy = self.copies.of(change.collection_id)
        assert change.partition is not None  # a PARTITION change carries its partition
        if copy is not None and not copy[0].has_partition_key():
            self.copies.partition(copy[1], change.partition.name, change.partition.id, change.partition.created_ts)

    def on_dropped_while_stopped(self, change: CatalogChange, ts: int) -> None:
        source = change.collection
        if source is None or source.id in self.copies.gone:
            return
        target = self.copies.existing_copy(source)
        if target is not None:
            log.info("task=%s %s was dropped on the source while the task was stopped", self.tid,
                     source.qualified_name)
            self.copies.drop(source, target, ts)
        else:
            self.copies.forget(source)

    def on_load_changed(self, change: CatalogChange, ts: int) -> None:
        copy = self.copies.of(change.collection_id)
        if copy is not None:
            self.outbox.flush()
            self.copies.sync_load(*copy, ts)


###############################################################################
# Task requests: what a create may say, checked ################################
###############################################################################

class ApiError(Exception):
    """A request the server refuses; ``code`` is the HTTP status and the body's code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
DIAL_KEYS = ("server_name", "server_pem_path", "ca_pem_path", "client_pem_path", "client_key_path")
GO_CONNECT_KEYS = ("host", "port", "enable_tls", "ignore_partition", "channel_num")  # shown by get as given
CONNECT_KEYS = ("uri", "token", "connect_timeout", "dial_config", "username", "password") + GO_CONNECT_KEYS
CREATE_KEYS = ("milvus_connect_param", "collection_infos", "db_collections", "name_mapping", "task_id",
               "disable_auto_start", "positions", "rpc_channel_info", "replay_existing", "buffer_config",
               "extra_info", "kafka_connect_param")
COLLECTION_INFO_KEYS = ("name", "positions", "use_start_position")


def refuse_unknown(where: str, given: Iterable[str], known: Iterable[str]) -> None:
    """400 for the first field not in ``known``, naming the nearest known one (a typo) and the rest."""
    known = list(known)
    for key in sorted(set(given) - set(known)):
        near = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ApiError(400, f"unknown field {where}{key}; {hint}expected {', '.join(known)}")


def checked(value: Any, kind: type, what: str, expect: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"{what} must be {expect}")
    return value


@dataclass
class CreateRequest:
    """A create request, checked: the task it makes and what the log should say about fields that mean nothing
    here."""
    task: TaskInfo
    notes: list[str]


def parse_create_request(data: Any, max_name_length: int, replicate_chan: str) -> CreateRequest:
    """Check a create request's ``request_data`` (the usage document's and the Go CDC's fields) and build the task;
    every refusal says what to fix."""
    if not isinstance(data, dict):
        raise ApiError(400, "request_data must be an object with milvus_connect_param and collection_infos")
    refuse_unknown("request_data.", data, CREATE_KEYS)
    notes: list[str] = []
    connect, shown = parse_connect_param(data.get("milvus_connect_param"), notes)
    kafka = data.get("kafka_connect_param") or {}
    if not isinstance(kafka, dict) or kafka.get("address"):
        raise ApiError(400, "kafka_connect_param: this server replicates to a Milvus target only; leave it out and "
                            "give milvus_connect_param")
    infos, db_collections, positions = parse_scope(data, max_name_length)
    if not infos and not db_collections:
        raise ApiError(400, 'collection_infos must be a non-empty list like [{"name": "*"}] (or give '
                            'db_collections like {"db1": [{"name": "*"}]})')
    positions += parse_positions(data.get("positions"), "positions", "")
    channel_info = checked(data.get("rpc_channel_info") or {}, dict, "rpc_channel_info",
                           'an object like {"name": "by-dev-replicate-msg"}')
    refuse_unknown("rpc_channel_info.", channel_info, ("name", "position"))
    if channel_info.get("name") not in (None, "", replicate_chan):
        raise ApiError(400, f"rpc_channel_info.name is {channel_info['name']!r} but this server reads the source's "
                            f"replicate channel {replicate_chan!r} (sourceConfig.replicateChan); give that name or "
                            f"leave it out")
    if channel_info.get("position"):
        positions += parse_positions({replicate_chan: channel_info["position"]}, "rpc_channel_info.position", "")
    seen: dict[tuple[str, str], StartPosition] = {}
    for position in positions:
        other = seen.setdefault((position.channel, position.collection), position)
        if other != position:
            raise ApiError(400, f"two different start positions for channel {position.channel}"
                                + (f" of {position.collection}" if position.collection else ""))
    task_id = data.get("task_id") or uuid.uuid4().hex
    if not isinstance(task_id, str) or not TASK_ID_PATTERN.fullmatch(task_id):
        raise ApiError(400, "task_id must be 1 to 128 letters, digits, _, - or . (starting with a letter or "
                            "digit), or left out for a generated one")
    replay = checked(data.get("replay_existing", False), bool, "replay_existing", "true or false")
    auto = checked(data.get("disable_auto_start", False), bool, "disable_auto_start", "true or false")
    if any(c["name"] == "*" and c.get("use_start_position") for c in infos):
        replay = True
    for key, meaning in (("buffer_config", "writes to the target are pipelined and sized by the server"),
                         ("extra_info", "users and roles are not replicated by this server")):
        if data.get(key):
            checked(data[key], dict, key, "an object")
            notes.append(f"{key} accepted, not used: {meaning}")
    return CreateRequest(TaskInfo(
        task_id=task_id, connect=connect, collection_infos=infos, replay_existing=replay,
        db_collections=db_collections, name_mapping=parse_name_mapping(data.get("name_mapping")),
        start_positions=sorted(seen.values(), key=lambda p: (p.channel, p.collection)), disable_auto_start=auto,
        connect_shown=shown), notes)


def parse_scope(data: dict, max_name_length: int) -> tuple[list[dict], dict[str, list[dict]], list[StartPosition]]:
    """collection_infos and db_collections: the collection infos as stored (name, use_start_position), and the
    start positions they carry."""
    positions: list[StartPosition] = []

    def infos_of(value: Any, where: str, db_name: str | None) -> list[dict]:
        if value is None or value == [] and db_name is None:  # Go clients send [] beside db_collections
            return []
        if not isinstance(value, list) or not value:
            raise ApiError(400, f'{where} must be a non-empty list like [{{"name": "*"}}]')
        found = []
        for index, info in enumerate(value):
            at = f"{where}[{index}]"
            if not isinstance(info, dict):
                raise ApiError(400, f'{at} must be an object like {{"name": "*"}}')
            refuse_unknown(f"{at}.", info, COLLECTION_INFO_KEYS)
            name = checked(info.get("name"), str, f"{at}.name", "a string")
            if len(name) > max_name_length:
                raise ApiError(400, f"{at}.name is longer than maxNameLength ({max_name_length} characters)")
            parts = name.split(".", 1) if db_name is None else [name]
            if name != "*" and not all(NAME_PATTERN.fullmatch(part) for part in parts):
                raise ApiError(400, f"{at}.name {name!r} is not a collection name: use *, a name (letters, digits, "
                                    f"_)" + (" or database.name" if db_name is None else ""))
            qualified = name if db_name is None else f"{db_name}.{name}"
            if db_name == "*" and name != "*":
                raise ApiError(400, f'{at}: the database "*" stands for every database and takes only '
                                    f'[{{"name": "*"}}]; name the database of {name!r}')
            if info.get("positions"):
                if name == "*":
                    raise ApiError(400, f"{at}.positions: a start position belongs to one collection's channels; "
                                        f"for every collection give the top-level positions")
                qualified = qualified if "." in qualified else f"{DEFAULT_DB}.{qualified}"
                positions.extend(parse_positions(info["positions"], f"{at}.positions", qualified))
            stored: dict[str, Any] = {"name": name}
            if checked(info.get("use_start_position", False), bool, f"{at}.use_start_position", "true or false"):
                stored["use_start_position"] = True
            found.append(stored)
        names = [c["name"] for c in found]
        if "*" in names and len(names) > 1:
            raise ApiError(400, f'{where}: "*" stands for every collection and must be alone')
        if len(set(names)) != len(names):
            raise ApiError(400, f"{where} names a collection twice")
        return found

    infos = infos_of(data.get("collection_infos"), "collection_infos", None)
    by_db = checked(data.get("db_collections") or {}, dict, "db_collections",
                    'an object like {"db1": [{"name": "*"}]}')
    db_collections = {}
    for db_name, value in by_db.items():
        if db_name != "*" and (not NAME_PATTERN.fullmatch(db_name) or len(db_name) > max_name_length):
            raise ApiError(400, f"db_collections: {db_name!r} is not a database name (letters, digits, _; or *)")
        db_collections[db_name] = infos_of(value, f"db_collections.{db_name}", db_name)
    return infos, db_collections, positions


def parse_positions(value: Any, where: str, collection: str) -> list[StartPosition]:
    if not value:
        return []
    checked(value, dict, where, 'an object like {"by-dev-rootcoord-dml_0_4467v0": "<base64 position>"}')
    found = []
    for key, text in value.items():
        try:
            found.append(StartPosition.decode(key, checked(text, str, f"{where}.{key}", "a base64 string"),
                                              collection))
        except ValueError as exc:
            raise ApiError(400, f"{where}.{key} {exc}: give the base64 msg_id a `position` answer shows "
                                f"(or a milvus-backup position)") from None
    return found


def parse_name_mapping(value: Any) -> list[dict]:
    """name_mapping as the Go CDC takes it: [{source_db, target_db, collection_mapping: {source: target}}]."""
    if not value:
        return []
    checked(value, list, "name_mapping", 'a list like [{"source_db": "db1", "target_db": "db2", '
                                         '"collection_mapping": {"c1": "c2"}}]')
    mappings: list[dict] = []
    for index, mapping in enumerate(value):
        at = f"name_mapping[{index}]"
        checked(mapping, dict, at, "an object with source_db, target_db and collection_mapping")
        refuse_unknown(f"{at}.", mapping, ("source_db", "target_db", "collection_mapping"))
        dbs = [checked(mapping.get(k) or DEFAULT_DB, str, f"{at}.{k}", "a database name")
               for k in ("source_db", "target_db")]
        pairs = checked(mapping.get("collection_mapping") or {}, dict, f"{at}.collection_mapping",
                        'an object like {"source_name": "target_name"}')
        for name in (*dbs, *pairs, *pairs.values()):
            if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
                raise ApiError(400, f"{at}: {name!r} is not a name (letters, digits, _)")
        if len(set(pairs.values())) != len(pairs):
            raise ApiError(400, f"{at}.collection_mapping maps two collections to one name")
        mappings.append({"source_db": dbs[0], "target_db": dbs[1], "collection_mapping": dict(pairs)})
    for key, what in (("source_db", "maps database {} twice"), ("target_db", "maps two databases to {}")):
        names = [m[key] for m in mappings]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ApiError(400, "name_mapping " + what.format(twice[0]))
    return mappings


def parse_connect_param(param: Any, notes: list[str]) -> tuple[ConnectParam, dict]:
    """milvus_connect_param in either style: ``uri``/``token`` (the usage document), or the Go CDC's
    ``host``/``port``/``enable_tls``/``username``/``password``; both may be given when they agree. Returns the
    connection and the Go style fields as given (get shows them; never the password)."""
    if not isinstance(param, dict):
        raise ApiError(400, 'milvus_connect_param must be an object like {"uri": "http://host:19530", '
                            '"token": "user:password", "connect_timeout": 10}')
    refuse_unknown("milvus_connect_param.", param, CONNECT_KEYS)
    at = "milvus_connect_param."
    tls = checked(param.get("enable_tls", False), bool, at + "enable_tls", "true or false")
    host = param.get("host") or ""
    port = param.get("port") or 0
    checked(host, str, at + "host", "a host name like localhost")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
        raise ApiError(400, f"{at}port must be a port number like 19530")
    uri = param.get("uri") or ""
    if not isinstance(uri, str):
        raise ApiError(400, f"{at}uri must be a string like http://localhost:19530")
    if not uri:
        if not host or not port:
            raise ApiError(400, f"{at}uri is required, like http://localhost:19530 (or give host and port)")
        uri = f"{'https' if tls else 'http'}://{host}:{port}"
    try:
        parsed = urllib.parse.urlsplit(uri)
        uri_port = parsed.port
    except ValueError:
        raise ApiError(400, f"{at}uri {uri!r} has an invalid port") from None
    if parsed.scheme not in ("http", "https", "tcp") or not parsed.hostname:
        raise ApiError(400, f"{at}uri {uri!r} must be http://, https:// or tcp:// and a host, like "
                            f"http://localhost:19530")
    if uri_port == 0:
        raise ApiError(400, f"{at}uri {uri!r} has an invalid port")
    if host and (host != parsed.hostname or port and port != (uri_port or 19530)):
        raise ApiError(400, f"{at}uri {uri!r} and host {host}" + (f", port {port}" if port else "")
                       + " name different servers; give one")
    if tls and parsed.scheme != "https":
        raise ApiError(400, f"{at}enable_tls is true but uri {uri!r} is not https://; make them agree")
    token = checked(param.get("token", ""), str, at + "token", "a string like user:password")
    user = checked(param.get("username") or "", str, at + "username", "a string")
    password = checked(param.get("password") or "", str, at + "password", "a string")
    if bool(user) != bool(password):
        raise ApiError(400, f"{at}username and password go together: give both or neither")
    if user:
        if token and token != f"{user}:{password}":
            raise ApiError(400, f"{at}token and username/password differ; give one")
        token = f"{user}:{password}"
    timeout = param.get("connect_timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600 \
            or timeout != timeout:
        raise ApiError(400, f"{at}connect_timeout must be a number of seconds from 0 to 3600")
    dial = param.get("dial_config") or {}
    if not isinstance(dial, dict):
        raise ApiError(400, f"{at}dial_config must be an object")
    refuse_unknown(f"{at}dial_config.", dial, DIAL_KEYS)
    for key, value in dial.items():
        checked(value, str, f"{at}dial_config.{key}", "a string")
    two_way = {"client_pem_path", "client_key_path"}
    if two_way & set(dial) and not two_way <= set(dial):
        raise ApiError(400, f"{at}dial_config needs both client_pem_path and client_key_path for two-way TLS")
    checked(param.get("ignore_partition", False), bool, at + "ignore_partition", "true or false")
    channel_num = checked(param.get("channel_num", 0), int, at + "channel_num", "a number of channels")
    if param.get("ignore_partition"):
        notes.append("milvus_connect_param.ignore_partition accepted, not needed: this server makes no partition "
                     "checks that a target could deny")
    if channel_num:
        notes.append("milvus_connect_param.channel_num accepted, not needed: shards are mapped onto the target's "
                     "own channels")
    shown = {k: param[k] for k in GO_CONNECT_KEYS if k in param}
    return ConnectParam(uri=uri, token=token, connect_timeout=float(timeout),
                        dial_config=tuple(sorted(dial.items()))), shown


###############################################################################
# Verification: a task's copy against its source ##############################
###############################################################################

class VerifyState(enum.Enum):
    RUNNING = "running"
    EQUAL = "equal"
    DIFFERENT = "different"
    FAILED = "failed"


@dataclass
class Difference:
    """One way a copy differs from its source: which collection (and partition), what, and example keys."""
    collection: str
    what: str
    partition: str = ""
    keys: list = field(default_factory=list)
    count: int = 0  # rows (or keys) that differ, when it is about rows

    def public(self) -> dict:
        shown: dict[str, Any] = {"collection": self.collection, "what": self.what}
        if self.partition:
            shown["partition"] = self.partition
        if self.count:
            shown["rows"] = self.count
        if self.keys:
            shown["example_keys"] = self.keys
        return shown


@dataclass
class Verification:
    """One verify run of a task: its progress while it runs, its result after (kept until the next run)."""
    started_at: float = field(default_factory=time.time)
    state: VerifyState = VerifyState.RUNNING
    collections: int = 0
    collections_done: int = 0
    rows_compared: int = 0
    finished_at: float = 0.0
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    # set when the task is deleted or the server stops: the run ends at its next step
    stop: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def seconds(self) -> float:
        return (self.finished_at or time.time()) - self.started_at

    def public(self) -> dict:
        shown: dict[str, Any] = {
            "state": self.state.value, "collections": self.collections, "collections_done": self.collections_done,
            "rows_compared": self.rows_compared, "seconds": round(self.seconds(), 3),
            "rows_per_second": round(self.rows_compared / max(self.seconds(), 1e-6)),
            "differences": [d.public() for d in self.differences]}
        if self.notes:
            shown["notes"] = self.notes
        if self.error:
            shown["error"] = self.error
        return shown


@dataclass(frozen=True)
class VerifyRequest:
    collections: tuple[str, ...] = ()  # as the task names them ("name", "db.name"); empty: every one it follows
    sample_vectors: int = 100

    @classmethod
    def parse(cls, data: dict) -> "VerifyRequest":
        names = data.get("collections") or []
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ApiError(400, 'request_data.collections must be a list of collection names, like ["c1", '
                                '"db1.c2"]')
        sample = data.get("sample_vectors", cls.sample_vectors)
        if not isinstance(sample, int) or isinstance(sample, bool) or not 0 <= sample <= 10000:
            raise ApiError(400, "request_data.sample_vectors must be an integer from 0 to 10000")
        return cls(tuple(names), sample)


class CopyVerifier:
    """Compares what a task replicates on the source with its copy on the target, while replication goes on.

    Per collection: the schema (fields, types, params, primary key, dynamic field), shard count, partitions,
    indexes with their params and load state; then, where both sides are loaded, the row count per partition,
    the set of primary keys (streamed in key order from both sides, a page at a time, so memory holds one page
    per side) and, for a sample of keys, every field's value (vectors exactly). The source keeps moving: a
    difference in rows is checked again a few times, RECHECK_WAIT apart, and reported only if it stays."""

    PAGE = 5000
    EXAMPLES = 20
    CANDIDATES = 20000  # differing keys held for the re-checks, per partition and kind
    # Pages are read Bounded (fast, and a little behind on either side); a key that differs there is read again
    # Strong, RECHECKS times, before it counts.
    PAGE_CONSISTENCY = "Bounded"
    RECHECKS = 3
    RECHECK_WAIT = 2.0
    INDEX_STATE_KEYS = {"total_rows", "indexed_rows", "pending_index_rows", "state", "index_state_fail_reason"}

    def __init__(self, task: TaskInfo, source: SourceSettings, request: VerifyRequest, run: Verification,
                 stop: threading.Event):
        self.task, self.request, self.run_, self.stop = task, request, run, stop
        if not source.milvus_uri:
            raise ApiError(400, "verify reads the source Milvus: set sourceConfig.milvus.uri (and token) in the "
                                "config")
        self.source_uri, self.source_token = source.milvus_uri, source.milvus_token
        self.clients: dict[tuple[str, str], Any] = {}

    def _client(self, side: str, db_name: str) -> Any:
        from pymilvus import MilvusClient
        key = (side, db_name)
        if key not in self.clients:
            uri, token = (self.source_uri, self.source_token) if side == "source" else \
                (self.task.connect.uri, self.task.connect.token)
            self.clients[key] = MilvusClient(uri=uri, token=token, db_name=db_name or "default", timeout=30,
                                             **(self._tls() if side == "target" else {}))
        return self.clients[key]

    TLS_KEYS = ("server_pem_path", "ca_pem_path", "client_pem_path", "client_key_path", "server_name")

    def _tls(self) -> dict[str, Any]:
        """A TLS target is read with the task's own dial_config, on connections of this run: pymilvus reuses an
        open connection of the same uri and token whatever its certificates."""
        if not self.task.connect.secure:
            return {}
        dial = dict(self.task.connect.dial_config)
        return {"secure": True, "alias": f"cdc-verify-{uuid.uuid4().hex}",
                **{k: dial[k] for k in self.TLS_KEYS if dial.get(k)}}

    def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                client.close()

    # -- the run --------------------------------------------------------------------------------------------

    def run(self) -> None:
        run = self.run_
        try:
            if not self.request.collections:
                self._databases()
            followed = self._followed()
            run.collections = len(followed)
            for db_name, name in followed:
                if self.stop.is_set():
                    raise TaskStopping()
                self._collection(db_name, name)
                run.collections_done += 1
            run.state = VerifyState.DIFFERENT if run.differences else VerifyState.EQUAL
        except TaskStopping:
            run.state, run.error = VerifyState.FAILED, "stopped: the task was deleted or the server stopped"
        except Exception as exc:  # noqa: BLE001 - the reason is the result; the trace goes to the log
            log.exception("task=%s verify failed", self.task.task_id)
            run.state, run.error = VerifyState.FAILED, describe_error(exc)
        finally:
            run.finished_at = time.time()
            self.close()
        log.info("task=%s verify: %s, %d collection(s), %d row(s) compared in %.1fs, %d difference(s)",
                 self.task.task_id, run.state.value, run.collections_done, run.rows_compared, run.seconds(),
                 len(run.differences))

    def _databases(self) -> None:
        """The databases the task replicates as such (a ``*`` or ``db.*`` task) exist on the target."""
        on_target = set(self._client("target", "").list_databases())
        for db_name in sorted(self._client("source", "").list_databases()):
            if self.task.filter.covers_database(db_name) and self.task.names.database(db_name) not in on_target:
                self._differ(db_name, f"database missing on the target (as {self.task.names.database(db_name)})")

    def _followed(self) -> list[tuple[str, str]]:
        source = self._client("source", "")
        wanted = CollectionFilter(list(self.request.collections)) if self.request.collections else None
        found = []
        for db_name in sorted(source.list_databases()):
            names = self._client("source", db_name).list_collections()
            for name in sorted(names):
                if self.task.filter.matches(db_name, name) and (wanted is None or wanted.matches(db_name, name)):
                    found.append((db_name, name))
        if wanted is not None and not found:
            raise ApiError(400, f"none of {list(self.request.collections)} is a source collection this task "
                                f"replicates")
        return found

    def _differ(self, collection: str, what: str, **more: Any) -> None:
        self.run_.differences.append(Difference(collection, what, **more))

    def _collection(self, db_name: str, name: str) -> None:
        label = f"{db_name}.{name}"
        target_db, target_name = self.task.names.collection(db_name, name)
        source, target = self._client("source", db_name), self._client("target", target_db)
        if not target.has_collection(target_name):
            self._differ(label, f"missing on the target (as {target_db}.{target_name})")
            return
        s_desc, t_desc = source.describe_collection(name), target.describe_collection(target_name)
        for what, s_value, t_value in self._structure(source, target, name, target_name, s_desc, t_desc):
            if s_value != t_value:
                self._differ(label, f"{what}: source {s_value!r}, target {t_value!r}")
        loaded = [self._loaded(c, n) for c, n in ((source, name), (target, target_name))]
        if loaded[0] != loaded[1]:
            self._differ(label, f"load state: source {'loaded' if loaded[0] else 'not loaded'}, target "
                                f"{'loaded' if loaded[1] else 'not loaded'}")
        if not all(loaded):
            self.run_.notes.append(self._unloaded_note(label, (source, name), (target, target_name)))
            return
        pk = next(f["name"] for f in s_desc["fields"] if f.get("is_primary"))
        if any(f.get("is_partition_key") for f in s_desc["fields"]):
            # Milvus names the partitions of a partition key itself, and refuses a query that names one
            partitions = [""]
        else:
            partitions = sorted(set(source.list_partitions(name)) & set(target.list_partitions(target_name)))
        for partition in partitions:
            self._rows(label, partition, pk, (source, name), (target, target_name))

    def _structure(self, source: Any, target: Any, name: str, target_name: str, s_desc: dict,
                   t_desc: dict) -> list[tuple[str, Any, Any]]:
        def fields(desc: dict) -> list[dict]:
            return [{k: f.get(k) for k in ("name", "type", "params", "is_primary", "auto_id", "is_partition_key",
                                           "element_type")} for f in desc["fields"]]

        def indexes(client: Any, collection: str) -> dict[str, dict]:
            found = {}
            for index_name in client.list_indexes(collection):
                described = client.describe_index(collection, index_name) or {}
                found[index_name] = {k: str(v) for k, v in described.items() if k not in self.INDEX_STATE_KEYS}
            return found
        return [("fields", fields(s_desc), fields(t_desc)),
                ("dynamic field", bool(s_desc.get("enable_dynamic_field")),
                 bool(t_desc.get("enable_dynamic_field"))),
                ("shards", s_desc.get("num_shards"), t_desc.get("num_shards")),
                ("partitions", sorted(source.list_partitions(name)), sorted(target.list_partitions(target_name))),
                ("indexes", indexes(source, name), indexes(target, target_name))]

    @staticmethod
    def _unloaded_note(label: str, *sides: tuple[Any, str]) -> str:
        """What can be said of the rows of a collection not loaded on both sides: the row counts of the statistics,
        which count flushed segments only (each side seals and flushes on its own schedule) and deleted rows too,
        so that they are shown, not judged."""
        counts = [int(client.get_collection_stats(name).get("row_count", 0)) for client, name in sides]
        return f"{label}: not loaded on both sides, rows not compared; the statistics count {counts[0]} flushed " \
               f"row(s) on the source, {counts[1]} on the target" + (" (equal)" if counts[0] == counts[1] else "")

    @staticmethod
    def _loaded(client: Any, name: str) -> bool:
        from pymilvus.client.types import LoadState
        return client.get_load_state(name).get("state") == LoadState.Loaded

    # -- rows -------------------------------------------------------------------------------------------------

    def _upper_bound(self, side: tuple[Any, str], partition: str, pk: str) -> int | None:
        """The largest integer key the side holds now (a bisection of one-key queries), None when it holds none:
        keys inserted later are not compared, or a source written in key order would never be caught up with."""
        client, name = side

        def exists(expr: str) -> bool:
            return bool(client.query(name, filter=expr, output_fields=[pk], limit=1,
                                     partition_names=self._within(partition), consistency_level=self.PAGE_CONSISTENCY))
        if not exists(""):
            return None
        low, high = -(1 << 63), (1 << 63) - 1  # the largest key lies in [low, high]
        while low < high:
            middle = (low + high + 1) // 2
            if exists(f"{pk} >= {middle}"):
                low = middle
            else:
                high = middle - 1
        return low

    def _pages(self, side: tuple[Any, str], partition: str, pk: str, quote: bool, bound: int | None = None):
        """The side's primary keys in key order, a page at a time (Milvus answers a query with a limit in key
        order), up to ``bound`` when given."""
        client, name = side
        last = None
        while True:
            if self.stop.is_set():
                raise TaskStopping()
            terms = [f"{pk} > {json.dumps(last) if quote else last}"] if last is not None else []
            if bound is not None:
                terms.append(f"{pk} <= {bound}")
            rows = client.query(name, filter=" and ".join(terms), output_fields=[pk], limit=self.PAGE,
                                partition_names=self._within(partition), consistency_level=self.PAGE_CONSISTENCY)
            keys = [row[pk] for row in rows]
            if not keys:
                return
            if keys != sorted(keys) or (last is not None and keys[0] <= last):
                raise TargetError(f"{name}: the server does not answer a query with a limit in key order; the keys "
                                  f"cannot be compared page by page")
            yield keys
            last = keys[-1]

    @staticmethod
    def _within(partition: str) -> list[str] | None:
        """A query's partition_names: "" stands for the whole collection (one with a partition key)."""
        return [partition] if partition else None

    @staticmethod
    def _merged(a_pages: Iterator[list], b_pages: Iterator[list]) -> Iterator[tuple[Any, bool, bool]]:
        """Two key-ordered streams of pages as one: (key, on the first side, on the second side)."""
        a = (key for page in a_pages for key in page)
        b = (key for page in b_pages for key in page)
        x, y = next(a, None), next(b, None)  # a primary key is never None
        while x is not None or y is not None:
            if y is None or (x is not None and x < y):
                yield x, True, False
                x = next(a, None)
            elif x is None or y < x:
                yield y, False, True
                y = next(b, None)
            else:
                yield x, True, True
                x, y = next(a, None), next(b, None)

    def _rows(self, label: str, partition: str, pk: str, source: tuple[Any, str], target: tuple[Any, str]) -> None:
        quote = False
        for client, name in (source, target):
            first = client.query(name, filter="", output_fields=[pk], limit=1,
                                 partition_names=self._within(partition), consistency_level="Strong")
            if first:
                quote = isinstance(first[0][pk], str)
                break
        missing: list = []
        extra: list = []
        sample: list = []
        counts = {"missing": 0, "extra": 0, "same": 0}
        rng = random.Random(0)
        bound = None if quote else self._upper_bound(source, partition, pk)
        for key, on_source, on_target in self._merged(self._pages(source, partition, pk, quote, bound),
                                                      self._pages(target, partition, pk, quote, bound)):
            self.run_.rows_compared += 1
            if on_source and on_target:
                counts["same"] += 1
                if len(sample) < self.request.sample_vectors:
                    sample.append(key)
                elif self.request.sample_vectors and (j := rng.randrange(counts["same"])) < len(sample):
                    sample[j] = key  # reservoir sampling: every common key as likely
            else:
                kind, held = ("missing", missing) if on_source else ("extra", extra)
                counts[kind] += 1
                if len(held) < self.CANDIDATES:
                    held.append(key)
        if bound is not None:
            # above the source's largest key: rows written since (on both sides soon), or extra on the target
            client, name = target
            extra += [row[pk] for row in client.query(name, filter=f"{pk} > {bound}", output_fields=[pk],
                                                      limit=self.PAGE, partition_names=self._within(partition),
                                                      consistency_level=self.PAGE_CONSISTENCY)]
        missing, extra = self._still_differing(pk, quote, source, target, partition, missing, extra)
        for held, kind, what in ((missing, "missing", "rows missing on the target"),
                                 (extra, "extra", "rows on the target that the source does not have")):
            if held:
                # beyond the keys held for the re-checks, the first count is the best there is
                self._differ(label, what, partition=partition, keys=held[:self.EXAMPLES],
                             count=len(held) if counts[kind] <= self.CANDIDATES else counts[kind])
        changed = self._values(pk, quote, source, target, partition, sample)
        if changed:
            self._differ(label, "rows whose values differ", partition=partition, keys=changed[:self.EXAMPLES],
                         count=len(changed))

    def _keys_in(self, side: tuple[Any, str], pk: str, quote: bool, partition: str, keys: list,
                 fields: list[str] | None = None) -> dict:
        client, name = side
        found: dict = {}
        for i in range(0, len(keys), self.PAGE):
            part = keys[i:i + self.PAGE]
            literal = json.dumps(part) if quote else "[" + ",".join(str(int(k)) for k in part) + "]"
            for row in client.query(name, filter=f"{pk} in {literal}", output_fields=fields or [pk],
                                    partition_names=self._within(partition), consistency_level="Strong"):
                found[row[pk]] = row
        return found

    def _still_differing(self, pk: str, quote: bool, source: tuple[Any, str], target: tuple[Any, str],
                         partition: str, missing: list, extra: list) -> tuple[list, list]:
        """Keys that differ again after each of the re-checks: rows in flight while the pages were read are
        not differences."""
        for _ in range(self.RECHECKS):
            if not missing and not extra:
                break
            if self.stop.wait(self.RECHECK_WAIT):
                raise TaskStopping()
            keys = missing + extra
            on_source, on_target = (self._keys_in(side, pk, quote, partition, keys) for side in (source, target))
            missing = [k for k in missing if k in on_source and k not in on_target]
            extra = [k for k in extra if k in on_target and k not in on_source]
        return missing, extra

    def _values(self, pk: str, quote: bool, source: tuple[Any, str], target: tuple[Any, str], partition: str,
                keys: list) -> list:
        changed = keys
        for attempt in range(self.RECHECKS + 1):
            if not changed:
                return []
            if attempt and self.stop.wait(self.RECHECK_WAIT):
                raise TaskStopping()
            on_source = self._keys_in(source, pk, quote, partition, changed, ["*"])
            on_target = self._keys_in(target, pk, quote, partition, changed, ["*"])
            changed = [k for k in changed if k in on_source and k in on_target and
                       self._comparable(on_source[k]) != self._comparable(on_target[k])]
        return changed

    @staticmethod
    def _comparable(row: dict) -> dict:
        """A row's fields as plain values: vectors as lists of floats (exact) or bytes."""
        def plain(value: Any) -> Any:
            if isinstance(value, (bytes, bytearray)):
                return bytes(value)
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if hasattr(value, "tolist"):
                return value.tolist()
            return value
        return {k: plain(v) for k, v in row.items()}


###############################################################################
# Task manager: lifecycle and checked requests ################################
###############################################################################

class TaskGauges:
    """The gauges of every task, read from the task manager when Prometheus scrapes (a prometheus_client
    custom collector): state, lag per source channel (the figure `get` shows), checkpoint age, read queue
    depth, and whether a fault is being waited out."""

    def __init__(self, manager: "TaskManager"):
        self.manager = manager

    def describe(self):
        return []  # computed at scrape time; nothing to check at registration

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        state = GaugeMetricFamily("milvus_cdc_task_state", "1 for the state a task is in", labels=["task_id", "state"])
        count = GaugeMetricFamily("milvus_cdc_tasks", "Tasks by state", labels=["state"])
        lag = GaugeMetricFamily("milvus_cdc_channel_lag_seconds", "How far behind the source a channel is "
                                "confirmed on the target", labels=["task_id", "channel"])
        age = GaugeMetricFamily("milvus_cdc_checkpoint_age_seconds", "Seconds since the task last stored its "
                                "checkpoint", labels=["task_id"])
        depth = GaugeMetricFamily("milvus_cdc_read_queue_batches", "Batches waiting between reader and applier "
                                  "(at most readChanLen)", labels=["task_id"])
        waiting = GaugeMetricFamily("milvus_cdc_task_waiting", "1 while the task waits out a fault",
                                    labels=["task_id"])
        totals = dict.fromkeys(TaskState, 0)
        now = time.time()
        for task, replicator, stopped_lag in self.manager.snapshot():
            totals[task.state] += 1
            for each in TaskState:
                state.add_metric([task.task_id, each.value], 1.0 if task.state == each else 0.0)
            channels = replicator.lag() if replicator is not None else stopped_lag or []
            for channel in channels:
                if channel["lag_seconds"] is not None:
                    lag.add_metric([task.task_id, channel["channel"]], channel["lag_seconds"])
            if replicator is not None:
                if stored_at := replicator.checkpoint.at:
                    age.add_metric([task.task_id], now - stored_at)
                depth.add_metric([task.task_id], replicator.read_queue.qsize())
                waiting.add_metric([task.task_id], 1.0 if replicator.faults() else 0.0)
        for each, number in totals.items():
            count.add_metric([each.value], number)
        yield from (state, count, lag, age, depth, waiting)


class TaskManager:
    """Owns the tasks: their stored state, their running replicators, and the tick clock of each target.

    The lock guards the dictionaries only: no meta store, target or thread join is waited on under it. A task
    being changed (created, paused, resumed, deleted, paused by a failure) is marked busy, and another change
    to it meanwhile is refused with 409. The store is written first and memory follows, so the two never
    disagree: a change the store refuses (503) leaves the task as it was.
    """

    PAUSED_BY_USER = "manually pause through http interface"
    NO_AUTO_START = "the task is disabled auto start"  # the Go CDC's words
    CREATED_STOPPED = "created with disable_auto_start: resume it to start"
    STOP_TIMEOUT = 60.0
    START_TIMEOUT = 60.0
    PROBE_TIMEOUT = 30.0
    CREATE_SLOTS = 4  # creates in progress at once; the server's other threads always answer list and get
    STORED_DIFFERENCES = 100  # of a verify result kept with the task

    def __init__(self, config: ServerConfig, store: TaskStore, metrics: Metrics | None = None):
        self.config, self.store = config, store
        self.metrics = metrics or Metrics()
        self.metrics.registry.register(TaskGauges(self))
        self.lock = threading.Lock()
        self.tasks: dict[str, TaskInfo] = {}
        self.replicators: dict[str, Replicator] = {}
        self.clocks: dict[str, TargetClock] = {}
        self.busy: set[str] = set()
        self.lags: dict[str, list[dict]] = {}  # the last lag of a task that stopped
        self.creates = threading.BoundedSemaphore(self.CREATE_SLOTS)
        self.retry = RetryPolicy.of(config.replication)  # every retry of the server, its tasks' too
        self.catalog_feed = CatalogFeed(config.source, self.retry)
        self.tail = KafkaTail(config.source.kafka) if config.source.mq_type == MqType.KAFKA else None
        self.verifications: dict[str, Verification] = {}  # the last verify run of each task, or the one running
        self.unsure: set[str] = set()     # tasks whose last write the store did not answer (it may still land)
        self.write_back_waits = Waits()   # by task id: its write-back waiting for the store, as get shows it
        self.writing_back: threading.Thread | None = None
        self.closing = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Bring back every stored task in its stored state: Running ones start again, Paused ones wait."""
        for task_id, data in sorted(self.store.load_tasks().items()):
            try:
                task = TaskInfo.from_store(data)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("task=%s cannot be restored, its stored info is damaged: %r", task_id, exc)
                continue
            if task.disable_auto_start and task.state == TaskState.RUNNING:
                # as the Go CDC: such a task runs only after a resume since the server started
                task = self._store(task, state=TaskState.PAUSED, reason=self.NO_AUTO_START)
            with self.lock:
                self.tasks[task_id] = task
            if task.state == TaskState.RUNNING or task.state == TaskState.INITIAL and not task.disable_auto_start:
                if task.state == TaskState.INITIAL:
                    self._store(task, state=TaskState.RUNNING)
                self._run(task)
            log.info("task=%s restored as %s", task_id, task.state.value)

    def shutdown(self) -> None:
        self.closing.set()
        with self.lock:
            for run in self.verifications.values():
                run.stop.set()
            replicators = list(self.replicators.values())
            self.replicators.clear()
            clocks = list(self.clocks.values())
        for replicator in replicators:
            replicator.stop_event.set()
        for replicator in replicators:
            replicator.stop()
        for clock in clocks:
            clock.close()
        self.catalog_feed.close()
        if self.tail is not None:
            self.tail.close()

    def _get(self, task_id: Any) -> TaskInfo:
        if not isinstance(task_id, str) or not task_id:
            raise ApiError(400, "request_data.task_id is required (a task id from create or list)")
        task = self.tasks.get(task_id)
        if task is None:
            raise ApiError(404, f"not found the task, task_id: {task_id}")
        return task

    @contextlib.contextmanager
    def _changing(self, task_id: Any):
        """The task, marked busy for the time of one change."""
        with self.lock:
            task = self._get(task_id)
            if task.task_id in self.busy:
                raise ApiError(409, f"task {task.task_id} is being changed by another request; try again")
            self.busy.add(task.task_id)
        try:
            yield task
        finally:
            with self.lock:
                self.busy.discard(task.task_id)

    def _store(self, task: TaskInfo, **changes) -> TaskInfo:
        """Write the task with ``changes`` to the store; memory is changed by the caller once this returned."""
        changed = dataclasses.replace(task, **changes)
        try:
            self.store.save_task(changed.task_id, changed.to_store())
        except MetaStoreUnavailable:
            # The request answers 503 and memory stays as it was, but the write may still land: an etcd that was
            # frozen applies what it had received once it runs again. What memory holds is written back once
            # the store answers, so that store and memory agree (seen: a pause answered 503 showed up in the
            # store as Paused after the outage, the task running). The late write is conditional on the document
            # it read, so it lands before the write-back or not at all.
            self._write_back_later(task.task_id)
            raise
        return changed

    def _write_back_later(self, task_id: str) -> None:
        with self.lock:
            self.unsure.add(task_id)
            if self.writing_back is None or not self.writing_back.is_alive():
                self.writing_back = threading.Thread(target=self._write_back, name="cdc-store-write-back",
                                                     daemon=True)
                self.writing_back.start()

    def _write_back(self) -> None:
        """Write what memory holds of each unsure task (or its absence) until the store takes it. Holds the task
        like a request does, so that no request's write goes between the read of memory and this write."""
        failures, since = 0, time.time()
        while not self.closing.wait(self.retry.delay(failures) if failures else 0):
            with self.lock:
                free = sorted(self.unsure - self.busy)
                if not self.unsure:
                    self.writing_back = None
                    return
                self.busy.update(free)
                held = {task_id: self.tasks.get(task_id) for task_id in free}
            done = []
            try:
                for task_id, task in held.items():
                    if task is None:
                        self.store.delete_task(task_id)  # a create that answered 503: it is not there
                    else:
                        self.store.save_task(task_id, task.to_store())
                    done.append(task_id)
                    log.info("task=%s written back to the meta store as this server holds it (%s)", task_id,
                             task.state.value if task is not None else "no such task")
                failures = 0 if free else failures + 1
            except MetaStoreUnavailable as exc:
                failures += 1
                for task_id in free:
                    self.write_back_waits.set(task_id, Wait("writing the task back to the meta store", since,
                                                            failures, str(exc)))
            finally:
                with self.lock:
                    self.busy.difference_update(free)
                    self.unsure.difference_update(done)
                for task_id in done:
                    self.write_back_waits.clear(task_id)

    def _run(self, task: TaskInfo, fence: tuple[Lease, str] | None = None) -> Replicator:
        with self.lock:
            if task.task_id in self.replicators:  # a pause whose threads did not stop yet
                raise ApiError(503, f"the threads of task {task.task_id} are still stopping; try again")
            clock = self.clocks.get(task.connect.address)
            if clock is None:
                clock = self.clocks[task.connect.address] = TargetClock(self.retry, task.connect.address,
                                                                         metrics=self.metrics)
                if fence is not None:
                    clock.hold_with(fence[0])  # from its first tick, not from the cluster agent's next sync
            replicator = Replicator(task, self.config, self.store, clock, self._on_failure,
                                    self.metrics.task(task.task_id), fence, self.catalog_feed, retry=self.retry,
                                    tail=self.tail)
            self.replicators[task.task_id] = replicator
            task.state, task.reason = TaskState.RUNNING, ""
        replicator.start()
        return replicator

    def _halt(self, task_id: str) -> None:
        """Stop a task's threads. When they do not stop in time the task is not reported stopped: 503."""
        with self.lock:
            replicator = self.replicators.get(task_id)
        if replicator is None:
            return
        if not replicator.stop(self.STOP_TIMEOUT):
            raise ApiError(503, f"the threads of task {task_id} did not stop within {self.STOP_TIMEOUT:g}s; "
                                f"try again")
        with self.lock:
            if self.replicators.get(task_id) is replicator:
                del self.replicators[task_id]
            self.lags[task_id] = replicator.lag()

    def _on_failure(self, replicator: Replicator, reason: str) -> None:
        """A task stopped itself: store it as paused with the reason (waiting for the store if need be), then
        show it so."""
        task_id = replicator.task.task_id
        tries, since = 0, time.time()
        while True:
            with self.lock:
                task = self.tasks.get(task_id)
                if task is None or self.replicators.get(task_id) is not replicator:
                    return  # paused, resumed or deleted meanwhile
                if task_id in self.busy:
                    retry = True
                else:
                    retry = False
                    self.busy.add(task_id)
            if not retry:
                try:
                    stored = self._store(task, state=TaskState.PAUSED, reason=reason)
                except MetaStoreUnavailable as exc:
                    log.warning("task=%s cannot store its pause yet: %s", task_id, exc)
                    replicator.waits.set("pause", Wait("storing the task's pause in the meta store", since,
                                                       tries + 1, str(exc)))
                else:
                    replicator.waits.clear("pause")
                    replicator.stop(self.STOP_TIMEOUT)
                    with self.lock:
                        if self.replicators.get(task_id) is replicator:
                            del self.replicators[task_id]
                        self.lags[task_id] = replicator.lag()
                        task.state, task.reason = stored.state, stored.reason
                        self.busy.discard(task_id)
                    return
                finally:
                    with self.lock:
                        self.busy.discard(task_id)
            tries += 1
            time.sleep(self.retry.delay(tries))

    # -- requests -----------------------------------------------------------------------------------------

    def create(self, data: Any) -> str:
        request = parse_create_request(data, self.config.max_name_length, self.config.source.replicate_chan)
        with self.lock:
            self._check_room(request.task)
        if not self.creates.acquire(blocking=False):
            raise ApiError(503, f"{self.CREATE_SLOTS} creates are already checking their targets; try again")
        try:
            task_id = self._create(request.task)
        finally:
            self.creates.release()
        for note in request.notes:
            log.info("task=%s %s", task_id, note)
        return task_id

    def _create(self, task: TaskInfo) -> str:
        problem = probe_target(task.connect, min(task.connect.connect_timeout, self.PROBE_TIMEOUT))
        if problem:
            raise ApiError(400, problem)
        with self.lock:
            self._check_room(task)
            self.tasks[task.task_id] = task
            self.busy.add(task.task_id)
        try:
            try:
                stored = self._store(task, **self._first_state(task))
            except BaseException:
                with self.lock:
                    del self.tasks[task.task_id]
                raise
            task.state, task.reason = stored.state, stored.reason
            if task.disable_auto_start:
                log.info("task=%s created, not started (disable_auto_start)", task.task_id)
                return task.task_id
            replicator = self._run(task)
            refusal = self._await_start(replicator)
            if refusal:
                self._undo_create(task, replicator)
                raise refusal
        finally:
            with self.lock:
                self.busy.discard(task.task_id)
        log.info("task=%s created for target %s, collections %s", task.task_id, task.connect.uri, task.scope())
        return task.task_id

    def _await_start(self, replicator: Replicator) -> ApiError | None:
        """Wait until a task that starts afresh has pinned its start positions, so that everything done on the
        source once the request is answered is replicated; else why it did not start."""
        deadline = time.monotonic() + self.START_TIMEOUT
        while not replicator.started.wait(0.1) and not replicator.stop_event.is_set() \
                and time.monotonic() < deadline:
            pass
        if replicator.started.is_set():
            return None
        reason = replicator.failure or f"it did not start within {self.START_TIMEOUT:g}s"
        return ApiError(400 if replicator.refused else 500, f"the task could not start: {reason}")

    def _first_state(self, task: TaskInfo) -> dict:
        if task.disable_auto_start:
            return {"state": TaskState.INITIAL, "reason": self.CREATED_STOPPED}
        return {"state": TaskState.RUNNING}

    def _undo_create(self, task: TaskInfo, replicator: Replicator) -> None:
        replicator.stop(self.STOP_TIMEOUT)
        with self.lock:
            self.replicators.pop(task.task_id, None)
            self.tasks.pop(task.task_id, None)
        try:
            self.store.delete_task(task.task_id)
        except MetaStoreUnavailable as exc:
            log.warning("task=%s failed to start and is removed from the meta store once it answers: %s",
                        task.task_id, exc)
            self._write_back_later(task.task_id)

    def _check_room(self, task: TaskInfo) -> None:
        """Under the lock."""
        if task.task_id in self.tasks:
            raise ApiError(409, f"task_id {task.task_id} is taken by another task; choose another or leave it out")
        if len(self.tasks) >= self.config.max_task_num:
            raise ApiError(400, f"the server already has maxTaskNum ({self.config.max_task_num}) tasks; "
                                f"delete one first")
        for other in self.tasks.values():
            if other.connect.address == task.connect.address and other.filter.overlaps(task.filter):
                raise ApiError(400, f"task {other.task_id} already replicates some of these collections to "
                                    f"{task.connect.uri}; delete it or name other collections")

    def delete(self, task_id: Any) -> None:
        with self._changing(task_id) as task:
            running = task.state == TaskState.RUNNING
            self._halt(task.task_id)  # first: a stopped task writes no checkpoint after its rows are gone
            try:
                self.store.delete_task(task.task_id)
            except BaseException as exc:
                if isinstance(exc, MetaStoreUnavailable):
                    self._write_back_later(task.task_id)  # the delete may still land: the task is written back
                if running:
                    self._run(task)
                raise
            with self.lock:
                del self.tasks[task.task_id]
                self.lags.pop(task.task_id, None)
            self._end_verification(task.task_id)
            self.metrics.forget(task.task_id)
        log.info("task=%s deleted", task_id)

    def pause(self, task_id: Any) -> None:
        with self._changing(task_id) as task:
            if task.state == TaskState.PAUSED:
                raise ApiError(400, f"task {task_id} is already paused")
            stored = self._store(task, state=TaskState.PAUSED, reason=self.PAUSED_BY_USER)
            with self.lock:
                task.state, task.reason = stored.state, stored.reason
            self._halt(task.task_id)
        log.info("task=%s paused", task_id)

    def resume(self, task_id: Any) -> None:
        with self._changing(task_id) as task:
            if task.state == TaskState.RUNNING:
                raise ApiError(400, f"task {task_id} is already running")
            self._halt(task.task_id)  # the threads of a pause that did not stop in time
            first = not self.store.load_checkpoints(task.task_id)  # never started: answered like a create
            self._store(task, state=TaskState.RUNNING, reason="")
            replicator = self._run(task)
            refusal = self._await_start(replicator) if first else None
            if refusal:
                raise refusal  # the task pauses itself with the reason
        log.info("task=%s resumed", task_id)

    def get(self, task_id: Any) -> dict:
        with self.lock:
            task = self._get(task_id)
            shown = task.public()
            replicator = self.replicators.get(task.task_id)
            lag = self.lags.get(task.task_id)
        if replicator is not None:
            shown.update(replicator.progress())
            if replicator.failure:
                shown["reason"] = replicator.failure  # being stored as paused
        elif lag is not None:
            shown["channels"] = lag
        else:
            try:
                shown["channels"] = self._stored_lag(task.task_id)
            except MetaStoreUnavailable:
                shown["channels"] = []
        writing_back = self.write_back_waits.of(task.task_id)
        if writing_back is not None:
            shown["retrying"] = shown.get("retrying", []) + [writing_back.public()]
        self._show_verification(task, shown)
        return shown

    def _show_verification(self, task: TaskInfo, shown: dict) -> None:
        with self.lock:
            run = self.verifications.get(task.task_id)
        if run is not None:
            shown["verify"] = run.public()
        elif task.last_verify:
            shown["verify"] = task.last_verify  # a run of before this server started

    def verify(self, task_id: Any, data: dict) -> dict:
        """Start comparing the task's copy with its source, in the background; `get` shows how far it is and,
        once done, its result."""
        request = VerifyRequest.parse(data)
        task = self._task_to_verify(task_id)
        with self.lock:
            running = self.verifications.get(task.task_id)
            if running is not None and running.state == VerifyState.RUNNING:
                raise ApiError(409, f"task {task.task_id} is being verified already (started "
                                    f"{time.time() - running.started_at:.0f}s ago); see get")
            run = Verification()
            verifier = CopyVerifier(task, self.config.source, request, run, run.stop)
            self.verifications[task.task_id] = run
        threading.Thread(target=self._verify, args=(task.task_id, verifier, run), name="cdc-verify",
                         daemon=True).start()
        log.info("task=%s verify started (collections %s, %d sampled rows)", task.task_id,
                 list(request.collections) or "all", request.sample_vectors)
        return run.public()

    def _task_to_verify(self, task_id: Any) -> TaskInfo:
        with self.lock:
            return self._get(task_id)

    def _verify(self, task_id: str, verifier: CopyVerifier, run: Verification) -> None:
        verifier.run()
        with self.lock:
            current = self.verifications.get(task_id) is run
        if current:  # a deleted task's series are gone and stay gone
            self.metrics.verified(task_id, run)
            self._keep_verification(task_id, run)

    def _keep_verification(self, task_id: str, run: Verification) -> None:
        """The result is stored with the task, so that `get` shows it after a restart too (at most
        STORED_DIFFERENCES of its differences: a task's document stays small)."""
        result = run.public()
        differences = result["differences"]
        if len(differences) > self.STORED_DIFFERENCES:
            result["differences"] = differences[:self.STORED_DIFFERENCES]
            result.setdefault("notes", []).append(f"{len(differences) - self.STORED_DIFFERENCES} more "
                                                  f"difference(s) not stored")
        try:
            written = self.store.update_task(task_id, lambda document: {**document, "last_verify": result})
        except MetaStoreUnavailable as exc:
            log.warning("task=%s the verify result is not stored (%s); get shows it until the server stops",
                        task_id, exc)
            return
        with self.lock:
            task = self.tasks.get(task_id)
            if task is not None and written is not None:
                task.last_verify = result  # what memory writes next keeps it

    def _end_verification(self, task_id: str) -> None:
        """A deleted task's verify run stops, and its result goes with it."""
        with self.lock:
            run = self.verifications.pop(task_id, None)
        if run is not None:
            run.stop.set()

    def _stored_lag(self, task_id: str) -> list[dict]:
        now = time.time()
        return [channel_lag(c.channel, c.timestamp, now) for c in sorted(self.store.load_checkpoints(task_id).values())]

    def list_tasks(self) -> list[dict]:
        with self.lock:
            return [t.public() for t in sorted(self.tasks.values(), key=lambda t: t.created_at)]

    def snapshot(self) -> list[tuple[TaskInfo, Replicator | None, list[dict] | None]]:
        """Every task with its running replicator (or None) and, for a stopped one, its last lag."""
        with self.lock:
            return [(t, self.replicators.get(t.task_id), self.lags.get(t.task_id)) for t in self.tasks.values()]

    def readiness(self) -> str | None:
        """None when the server can do its work, else why not: the meta store must answer and every running
        task's threads must be alive."""
        try:
            self.store.ping()
        except MetaStoreUnavailable as exc:
            return str(exc)
        for task, replicator, _ in self.snapshot():
            if task.state == TaskState.RUNNING and (replicator is None or not replicator.alive()):
                why = replicator.failure if replicator is not None and replicator.failure else "its threads stopped"
                return f"task {task.task_id} is running but not replicating: {why}"
        return self.ticks_problem()

    def ticks_problem(self) -> str | None:
        """Why a target gets no time ticks, once that has lasted retryTimeout: its data stops becoming visible."""
        with self.lock:
            clocks = list(self.clocks.values())
        for clock in clocks:
            for wait in clock.waits.snapshot():
                if self.retry.expired(wait.since):
                    return f"{wait.operation} fails since {wait.public()['since']}: {wait.last_error}"
        return None

    def positions(self, task_id: Any) -> dict:
        """Where the task stands on each source channel: the data channels under ``positions``, the replicate
        channel under ``op_positions`` (the Go CDC's split). ``msg_id`` is a base64 MsgPosition (the channel,
        the MQ id and the time everything at or below is on the target): given back to create as ``positions``
        (or ``rpc_channel_info.position``), a new task goes on from there with nothing missing or twice."""
        with self.lock:
            task = self._get(task_id)
        replicate = self.config.source.replicate_chan
        found: dict[str, list[dict]] = {"positions": [], "op_positions": [], "target_positions": []}
        for c in sorted(self.store.load_checkpoints(task.task_id).values()):
            found["op_positions" if c.channel == replicate else "positions"].append({
                "collection_id": 0, "channel_name": c.channel, "channel": c.channel,
                "msg_id": StartPosition(c.channel, c.msg_id, c.timestamp).encode(), "timestamp": c.timestamp,
                "tt": c.timestamp, "time": int(ts_seconds(c.timestamp) * 1000), "resume": c.resume})
        return found


###############################################################################
# Cluster: several servers, one set of tasks ##################################
###############################################################################

class ClusterAgent:
    """This server's part in a cluster of servers sharing one meta store (same rootPath).

    Each target (all the tasks replicating to one target address, which share its time ticks) is held by one
    live server through a lease in the store; the agent keeps this server's lease alive, takes its share of the
    targets (targets in name order dealt round-robin over the live servers in name order), hands over the
    targets another server should have, and has the task manager run exactly the tasks of the targets it holds,
    as the store says they should be. A lease that could not be renewed in time stops every task it covered
    before anything else is written (the fence: writes are conditional on the lease, and checked locally)."""

    SYNC_INTERVAL = 1.0

    def __init__(self, manager: "ClusterTaskManager", store: LeaseStore, server_id: str, ttl: float):
        self.manager, self.store, self.server_id, self.ttl = manager, store, server_id, ttl
        self.stopping = threading.Event()
        self.woken = threading.Event()
        self.threads: list[threading.Thread] = []
        # The sync thread owns both; the renewal thread reads them under the lock (no I/O under it).
        self.lock = threading.Lock()
        self.lease: Lease | None = None
        self.held: set[str] = set()

    def start(self) -> None:
        # Renewals have a thread of their own: the sync thread waits on tasks that stop (a call in flight can
        # take its whole timeout), and a renewal that waited behind them would lose every target.
        self.threads = [threading.Thread(target=self._run, name="cdc-cluster", daemon=True),
                        threading.Thread(target=self._renew_loop, name="cdc-lease", daemon=True)]
        for thread in self.threads:
            thread.start()

    def wake(self) -> None:
        self.woken.set()

    def stop(self) -> None:
        self.stopping.set()
        self.woken.set()
        for thread in self.threads:
            thread.join(self.manager.STOP_TIMEOUT)
        self.manager.sync(set(), None, None)
        if self.lease is not None and self.lease.valid():
            with contextlib.suppress(MetaStoreUnavailable):
                self.store.leave(self.lease)  # the others take over at once rather than after the TTL

    def _renew_loop(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                lease, held = self.lease, frozenset(self.held)
            if lease is not None and not lease.gone and time.monotonic() - lease.renewed_at >= self.ttl / 3:
                try:
                    if not self.store.renew(lease, held) and self._unchanged(lease, held):
                        lease.gone = True  # the fence closes now, before the sync thread gets to the tasks
                        log.warning("cluster: the store no longer has the lease of server %s on %s",
                                    self.server_id, sorted(held))
                        self.woken.set()
                except MetaStoreUnavailable as exc:
                    log.warning("cluster: %s", exc)
                except Exception:  # noqa: BLE001 - renewals must go on; the trace goes to the log
                    log.exception("cluster: renewing the lease failed")
            self.stopping.wait(min(self.SYNC_INTERVAL, self.ttl / 6))

    def _unchanged(self, lease: Lease, held: frozenset[str]) -> bool:
        """Is this still what the sync thread holds? (A target handed over meanwhile is not renewed, rightly.)"""
        with self.lock:
            return self.lease is lease and self.held == held

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.lease is None:
                    lease = self.store.join(self.server_id, self.ttl)
                    with self.lock:
                        self.lease = lease
                    log.info("cluster: server %s joined (lease ttl %gs)", self.server_id, self.ttl)
                elif self.lease.gone:
                    self._lost("its lease expired in the store")
                    continue
                self._sync()
            except MetaStoreUnavailable as exc:
                log.warning("cluster: %s", exc)
            except Exception:  # noqa: BLE001 - the loop must go on; the trace goes to the log
                log.exception("cluster: sync failed")
            if self.lease is not None and not self.lease.valid() and self.held:
                self._lost("its lease could not be renewed in time")
            self.woken.wait(min(self.SYNC_INTERVAL, self.ttl / 6))
            self.woken.clear()

    def _lost(self, why: str) -> None:
        log.warning("cluster: server %s lost its targets %s: %s", self.server_id, sorted(self.held), why)
        with self.lock:
            self.held = set()
            self.lease = None  # join again, with a new token: nothing held with the old one counts
        self.manager.sync(set(), None, None)

    def _sync(self) -> None:
        assert self.lease is not None  # _run joins before it syncs, and only its thread changes the lease
        tasks = self.manager.stored_tasks()
        servers = sorted(self.store.servers())
        owners = self.store.owners()
        targets = sorted({t.connect.address for t in tasks.values()})
        share = {t: servers[i % len(servers)] for i, t in enumerate(targets)} if servers else {}
        for target in sorted(self.held):
            if owners.get(target) != self.server_id:
                log.warning("cluster: target %s is no longer held by %s", target, self.server_id)
                with self.lock:
                    self.held.discard(target)
            elif share.get(target) != self.server_id:  # no task left there, or another server's share now
                with self.lock:
                    self.held.discard(target)
                self.manager.sync(self.held, self.lease, tasks)  # its tasks stop before the lease goes
                self.store.release(self.lease, target)
                log.info("cluster: %s handed target %s over to %s", self.server_id, target,
                         share.get(target, "nobody (no task left)"))
        for target in targets:
            if share[target] == self.server_id and target not in self.held and self.lease.valid() and \
                    self.store.acquire(self.lease, target):
                with self.lock:
                    self.held.add(target)
                log.info("cluster: %s took target %s", self.server_id, target)
        self.manager.sync(self.held, self.lease, tasks)


class ClusterTaskManager(TaskManager):
    """The task manager of a server in a cluster: the meta store holds what every task should be, the servers
    divide the targets (ClusterAgent), and each runs the tasks of the targets it holds. Any server answers the
    API for every task: a change is written to the store, and the server holding the task's target follows it
    within a second or two. `list` and `get` read the store, and show each task's ``owner``."""

    PICKUP_TIMEOUT = 60.0

    def __init__(self, config: ServerConfig, store: TaskStore, leases: LeaseStore, metrics: Metrics,
                 server_id: str, ttl: float):
        super().__init__(config, store, metrics)
        self.server_id, self.leases = server_id, leases
        self.agent = ClusterAgent(self, leases, server_id, ttl)

    def restore(self) -> None:
        self.agent.start()

    def shutdown(self) -> None:
        self.agent.stop()
        super().shutdown()

    def stored_tasks(self) -> dict[str, TaskInfo]:
        found = {}
        for task_id, data in self.store.load_tasks().items():
            try:
                found[task_id] = TaskInfo.from_store(data)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("task=%s is damaged in the store and left out: %r", task_id, exc)
        return found

    def sync(self, held: set[str], lease: Lease | None, tasks: dict[str, TaskInfo] | None) -> None:
        """Run exactly the Running tasks of the targets held; stop the others (the agent's thread only)."""
        tasks = tasks if tasks is not None else {}
        with self.lock:
            running = dict(self.replicators)
            for address, clock in self.clocks.items():
                clock.hold_with(lease if address in held else Lease("", "", 0, 0))  # an invalid fence: no ticks
        leaving: dict[str, TaskInfo | None] = {}
        for task_id, replicator in running.items():
            task = tasks.get(task_id)
            if task is None or task.connect.address not in held or task.state != TaskState.RUNNING or \
                    not replicator.alive() and replicator.stop_event.is_set() and not replicator.failed:
                leaving[task_id] = task
                replicator.stop(0)  # all at once: each waits out its calls in flight at the same time
        for task_id, task in leaving.items():
            with contextlib.suppress(ApiError):
                self._halt(task_id)
            if task is not None:
                log.info("task=%s stopped here (%s)", task_id, "paused" if task.state != TaskState.RUNNING
                         else "its target is not held by this server")
        with self.lock:
            self.tasks = tasks
        for task_id, task in sorted(tasks.items()):
            if task.state == TaskState.RUNNING and task.connect.address in held and task_id not in self.replicators:
                assert lease is not None  # a target is held only under a lease
                with contextlib.suppress(ApiError):
                    self._run(task, fence=(lease, task.connect.address))
                    log.info("task=%s runs here, on server %s", task_id, self.server_id)

    def _on_failure(self, replicator: Replicator, reason: str) -> None:
        """A task stopped itself: store it as paused, as long as this server still holds its target."""
        tries, since = 0, time.time()
        ran = replicator.task

        def still_running(state: TaskState, data: dict) -> ApiError | None:
            if state != TaskState.RUNNING or data.get("created_at") != ran.created_at:
                return ApiError(409, "paused, or deleted and created again, meanwhile")
            return None
        while replicator.fence is None or replicator.fence[0].valid():
            try:
                # Only over the run that failed: a pause, resume or delete on another server meanwhile stands.
                with contextlib.suppress(ApiError):
                    self._change_stored(ran.task_id, TaskState.PAUSED, reason, still_running)
                replicator.waits.clear("pause")
                self.agent.wake()
                return
            except MetaStoreUnavailable as exc:
                log.warning("task=%s cannot store its pause yet: %s", replicator.task.task_id, exc)
                replicator.waits.set("pause", Wait("storing the task's pause in the meta store", since, tries + 1,
                                                   str(exc)))
            tries += 1
            time.sleep(self.retry.delay(tries))

    def _change_stored(self, task_id: str, state: TaskState, reason: str,
                       refused: Callable[[TaskState, dict], ApiError | None]) -> None:
        """Change a task's state in the store, unless ``refused`` objects to the state stored right then: a
        conditional write, so a change made on another server meanwhile is never undone."""
        def change(data: dict) -> dict:
            refusal = refused(TaskState(data.get("state", TaskState.INITIAL.value)), data)
            if refusal is not None:
                raise refusal
            return {**data, "state": state.value, "reason": reason}
        if self.store.update_task(task_id, change) is None:
            raise ApiError(404, f"not found the task, task_id: {task_id}")

    def _find(self, task_id: Any) -> TaskInfo:
        if not isinstance(task_id, str) or not task_id:
            raise ApiError(400, "request_data.task_id is required (a task id from create or list)")
        task = self.stored_tasks().get(task_id)
        if task is None:
            raise ApiError(404, f"not found the task, task_id: {task_id}")
        return task

    def _show(self, task: TaskInfo, owners: dict[str, str]) -> dict:
        shown = task.public()
        shown["owner"] = owners.get(task.connect.address)
        return shown

    # -- requests: to the store; the target's holder follows -------------------------------------------------

    def create(self, data: Any) -> str:
        request = parse_create_request(data, self.config.max_name_length, self.config.source.replicate_chan)
        task = request.task
        stored_tasks = self.stored_tasks()
        with self.lock:
            self.tasks = stored_tasks
            self._check_room(task)
        if not self.creates.acquire(blocking=False):
            raise ApiError(503, f"{self.CREATE_SLOTS} creates are already checking their targets; try again")
        try:
            problem = probe_target(task.connect, min(task.connect.connect_timeout, self.PROBE_TIMEOUT))
            if problem:
                raise ApiError(400, problem)
            if not self.store.create_task(task.task_id, dataclasses.replace(task, **self._first_state(task))
                                          .to_store()):
                raise ApiError(409, f"task_id {task.task_id} is taken by another task; choose another or leave it out")
            self.agent.wake()
            if task.disable_auto_start:
                return task.task_id
            refusal = self._await_pickup(task.task_id)
            if refusal:
                with contextlib.suppress(MetaStoreUnavailable):
                    self.store.delete_task(task.task_id)
                raise refusal
        finally:
            self.creates.release()
        log.info("task=%s created for target %s, collections %s", task.task_id, task.connect.uri, task.scope())
        for note in request.notes:
            log.info("task=%s %s", task.task_id, note)
        return task.task_id

    def pause(self, task_id: Any) -> None:
        task = self._find(task_id)
        self._change_stored(task.task_id, TaskState.PAUSED, self.PAUSED_BY_USER, lambda state, _: ApiError(
            400, f"task {task_id} is already paused") if state == TaskState.PAUSED else None)
        self.agent.wake()
        log.info("task=%s paused", task_id)

    def _await_pickup(self, task_id: str) -> ApiError | None:
        """Wait until the server holding a task's target has pinned its start positions; else why not."""
        deadline = time.monotonic() + self.PICKUP_TIMEOUT
        while time.monotonic() < deadline:
            stored = self.stored_tasks().get(task_id)
            if stored is not None and stored.state == TaskState.PAUSED and stored.reason:
                return ApiError(500, f"the task could not start: {stored.reason}")
            if self.store.load_checkpoints(task_id):
                return None
            time.sleep(0.2)
        return ApiError(500, f"no server started the task within {self.PICKUP_TIMEOUT:g}s")

    def resume(self, task_id: Any) -> None:
        task = self._find(task_id)
        if task.state == TaskState.RUNNING:
            raise ApiError(400, f"task {task_id} is already running")
        first = not self.store.load_checkpoints(task.task_id)  # never started: answered like a create
        self._change_stored(task.task_id, TaskState.RUNNING, "", lambda state, _: ApiError(
            400, f"task {task_id} is already running") if state == TaskState.RUNNING else None)
        self.agent.wake()
        if first:
            refusal = self._await_pickup(task.task_id)
            if refusal:
                raise refusal
        log.info("task=%s resumed", task_id)

    def delete(self, task_id: Any) -> None:
        task = self._find(task_id)
        self.store.delete_task(task.task_id)  # a late checkpoint write of its holder finds it gone: not written
        self.agent.wake()
        self._end_verification(task.task_id)
        self.metrics.forget(task.task_id)
        log.info("task=%s deleted", task_id)

    def get(self, task_id: Any) -> dict:
        task = self._find(task_id)
        shown = self._show(task, self.leases.owners())
        with self.lock:
            replicator = self.replicators.get(task.task_id)
        if replicator is not None:
            shown.update(replicator.progress())
        else:
            shown["channels"] = self._stored_lag(task.task_id)
        self._show_verification(task, shown)
        return shown

    def _task_to_verify(self, task_id: Any) -> TaskInfo:
        return self._find(task_id)

    def list_tasks(self) -> list[dict]:
        owners = self.leases.owners()
        return [self._show(t, owners) for t in sorted(self.stored_tasks().values(), key=lambda t: t.created_at)]

    def readiness(self) -> str | None:
        try:
            self.store.ping()
        except MetaStoreUnavailable as exc:
            return str(exc)
        if self.agent.lease is None:
            return "this server has not joined the cluster yet"
        held = set(self.agent.held)
        for task, replicator, _ in self.snapshot():
            if task.state == TaskState.RUNNING and task.connect.address in held and \
                    (replicator is None or not replicator.alive()):
                return f"task {task.task_id} is held here but not replicating"
        return self.ticks_problem()


###############################################################################
# HTTP API #####################################################################
###############################################################################

class CdcApi:
    """``POST /cdc`` with ``{"request_type": ..., "request_data": {...}}``; answers ``{"code", "message",
    "data"}`` with the HTTP status equal to ``code``."""

    MAX_BODY = 1 << 20
    REQUEST_TYPES = ("create", "delete", "pause", "resume", "get", "list", "position", "maintenance", "verify")
    FIELDS = {"delete": ("task_id", "ignore_not_found"), "maintenance": ("operation", "params"),
              "verify": ("task_id", "collections", "sample_vectors")}
    MAINTENANCE = ("set_log_level",)

    def __init__(self, manager: TaskManager, api_token: str = ""):
        import bottle
        self.bottle, self.manager = bottle, manager
        self.api_token = api_token.encode()
        self.app = bottle.Bottle()
        self.app.route("/cdc", method="POST", callback=self.handle)
        self.app.route("/metrics", method="GET", callback=self.metrics)
        self.app.route("/cdc/metrics", method="GET", callback=self.metrics)  # the Go CDC's path
        self.app.route("/healthz", method="GET", callback=lambda: self.reply(200, "serving", status="ok"))
        self.app.route("/readyz", method="GET", callback=self.ready)
        self.app.route("/cdc", method=["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"],
                       callback=lambda: self.reply(405, "use POST for /cdc"))
        for status in (400, 404, 405, 413, 500):
            self.app.error(status)(lambda error, status=status: self._error_page(status, error))

    def _error_page(self, status: int, error) -> str:
        messages = {404: "not found: the API is POST /cdc", 405: "use POST for /cdc",
                    413: f"request body is larger than {self.MAX_BODY} bytes"}
        self.bottle.response.content_type = "application/json"
        return json.dumps({"code": status, "message": messages.get(status, "bad request" if status < 500
                                                                   else "internal error, see the server log")})

    def reply(self, code: int, message: str = "", data: Any = None, **extra):
        body = {"code": code, "message": message, **extra}
        if data is not None:
            body["data"] = data
        return self.bottle.HTTPResponse(json.dumps(body), status=code, headers={"Content-Type": "application/json"})

    def handle(self):
        started, kind = time.monotonic(), "unknown"
        try:
            self._authorize()
            body = self._body()
            kind = body.get("request_type") if body.get("request_type") in self.REQUEST_TYPES else "unknown"
            answer = self.reply(200, "", self.dispatch(body))
        except ApiError as exc:
            if exc.code >= 500:
                log.error("api: %s", exc.message)
            answer = self.reply(exc.code, exc.message)
        except MetaStoreUnavailable as exc:
            log.warning("api: %s", exc)
            answer = self.reply(503, f"{exc}; try again")
        except Exception:  # noqa: BLE001 - the client gets a short message, the log gets the trace
            log.exception("api: internal error")
            answer = self.reply(500, "internal error, see the server log")
        log.debug("api: %s answered %d in %.3fs", kind, answer.status_code, time.monotonic() - started)
        metrics = self.manager.metrics
        metrics.api_requests.labels(kind, str(answer.status_code)).inc()
        metrics.api_seconds.labels(kind).observe(time.monotonic() - started)
        return answer

    def metrics(self):
        try:
            self._authorize()
        except ApiError as exc:
            return self.reply(exc.code, exc.message)
        text, content_type = self.manager.metrics.exposition()
        return self.bottle.HTTPResponse(text, status=200, headers={"Content-Type": content_type})

    def ready(self):
        problem = self.manager.readiness()
        if problem:
            return self.reply(503, problem, status="not ready")
        return self.reply(200, "ready", status="ready")

    def _authorize(self) -> None:
        if not self.api_token:
            return
        given = self.bottle.request.get_header("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_token):
            raise ApiError(401, "this server needs the header Authorization: Bearer <apiToken of its config>")

    def _body(self) -> dict:
        request = self.bottle.request
        length = request.content_length
        if length > self.MAX_BODY:
            raise ApiError(413, f"request body is larger than {self.MAX_BODY} bytes")
        raw = request.body.read(self.MAX_BODY + 1)
        if len(raw) > self.MAX_BODY:
            raise ApiError(413, f"request body is larger than {self.MAX_BODY} bytes")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, 'request body must be a JSON object like {"request_type": "list"}')
        unknown = set(body) - {"request_type", "request_data"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}; a request has request_type and "
                                f"request_data")
        return body

    def dispatch(self, body: dict) -> dict:
        kind = body.get("request_type")
        if kind not in self.REQUEST_TYPES:
            raise ApiError(400, f"request_type must be one of {', '.join(self.REQUEST_TYPES)}; got {kind!r}")
        data = body.get("request_data")
        if kind == "create":
            return {"task_id": self.manager.create(data)}
        if kind == "list":
            if data not in (None, {}):
                raise ApiError(400, "list takes no request_data")
            return {"tasks": self.manager.list_tasks()}
        fields = self.FIELDS.get(kind, ("task_id",))
        if not isinstance(data, dict):
            raise ApiError(400, f"{kind} needs request_data with {' and '.join(fields)}")
        refuse_unknown("request_data.", data, fields)
        if kind == "maintenance":
            return self.maintenance(data.get("operation"), data.get("params"))
        task_id = data.get("task_id")
        if kind == "get":
            shown = self.manager.get(task_id)
            return {"Task": shown, "task": shown}  # the usage document's key, and the Go CDC's clients'
        if kind == "position":
            return {"task_id": task_id, **self.manager.positions(task_id)}
        if kind == "verify":
            return {"task_id": task_id, "verify": self.manager.verify(task_id, data)}
        if kind == "delete":
            ignore = checked(data.get("ignore_not_found", False), bool, "ignore_not_found", "true or false")
            try:
                self.manager.delete(task_id)
            except ApiError as exc:
                if not (ignore and exc.code == 404):
                    raise
            return {}
        getattr(self.manager, kind)(task_id)
        return {}

    def maintenance(self, operation: Any, params: Any) -> dict:
        if operation not in self.MAINTENANCE:
            raise ApiError(400, f"maintenance operation {operation!r} is not supported here; supported: "
                                f"{', '.join(self.MAINTENANCE)}")
        level = (params or {}).get("log_level") if isinstance(params, dict) else None
        name = log_level_name(level) if isinstance(level, str) else None
        if not isinstance(level, str) or name is None:
            raise ApiError(400, 'set_log_level needs params {"log_level": "debug" | "info" | "warn" | "error"}')
        apply_log_level(name)
        log.info("log level set to %s", level.lower())
        return {"state": f"set log level to {level.lower()}"}


###############################################################################
# Main #########################################################################
###############################################################################

# Chosen, not waitress's defaults: enough threads that the few a slow create may hold (TaskManager.CREATE_SLOTS)
# never starve list and get; many idle connections allowed, and closed after 30 s of silence.
WAITRESS_LIMITS = {"threads": 16, "connection_limit": 1000, "channel_timeout": 30, "cleanup_interval": 5,
                   "max_request_body_size": 2 << 20}


# glibc's mallopt parameter M_ARENA_MAX (malloc.h); Python's ctypes and os name no such constant.
M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Two malloc arenas instead of glibc's eight per core. Each thread that allocates a message's bytes while
    another holds an arena gets an arena of its own, which keeps its freed pages: with a reader, an applier, the
    send lanes and gRPC's threads, resident memory at catch-up grew with the number of arenas touched, not with the
    data in flight. Skipped when MALLOC_ARENA_MAX is set (the operator's choice) or the C library is not glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # not glibc (musl has no arenas to limit)
        pass


def apply_log_level(level: str) -> None:
    """The server's level; the MQ clients and waitress's queue stay at warning or above, their info is noise."""
    logging.getLogger().setLevel(level)
    for name in ("kafka", "pulsar", "waitress.queue"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


class VerifyCommand:
    """``python milvus_cdc.py verify -c config.yaml --task ID [--collection NAME] [--json]``: asks the server
    the config describes to verify a task's copy, waits for the answer and prints it. Exit 0 when the copy is
    equal, 1 when it differs, 2 when the verification could not be made."""

    POLL = 1.0

    def __init__(self, argv: list[str]):
        parser = argparse.ArgumentParser(prog="milvus_cdc.py verify",
                                         description="Compare a task's copy on the target with its source")
        parser.add_argument("-c", "--config", default="config.yaml", help="the server's YAML config")
        parser.add_argument("--task", required=True, help="the task id")
        parser.add_argument("--collection", action="append", default=[],
                            help="only this collection (name, or db.name); may be repeated")
        parser.add_argument("--sample-vectors", type=int, default=VerifyRequest.sample_vectors,
                            help="rows whose every field is compared, per partition")
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
        self.args = parser.parse_args(argv)

    def _post(self, config: ServerConfig, body: dict) -> dict:
        import urllib.error
        import urllib.request
        host = "127.0.0.1" if config.host in ("", "0.0.0.0", "::") else config.host
        request = urllib.request.Request(f"http://{host}:{config.port}/cdc", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        if config.api_token:
            request.add_header("Authorization", f"Bearer {config.api_token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read() or b"{}") or {"code": exc.code, "message": str(exc)}

    def run(self) -> int:
        args = self.args
        try:
            config, _ = load_config(args.config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        try:
            answer = self._post(config, {"request_type": "verify", "request_data": {
                "task_id": args.task, "collections": args.collection, "sample_vectors": args.sample_vectors}})
            while answer.get("code") == 200:
                time.sleep(self.POLL)
                answer = self._post(config, {"request_type": "get", "request_data": {"task_id": args.task}})
                result = answer.get("data", {}).get("task", {}).get("verify", {})
                if answer.get("code") == 200 and result.get("state") not in (None, VerifyState.RUNNING.value):
                    return self._print(result)
        except OSError as exc:
            print(f"the CDC server of {args.config} did not answer: {exc}", file=sys.stderr)
            return 2
        print(f"verify refused ({answer.get('code')}): {answer.get('message')}", file=sys.stderr)
        return 2

    def _print(self, result: dict) -> int:
        if self.args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{result['state']}: {result['collections_done']} collection(s), {result['rows_compared']} "
                  f"row(s) compared in {result['seconds']:.1f}s")
            for difference in result["differences"]:
                where = difference["collection"] + (f" ({difference['partition']})" if "partition" in difference
                                                    else "")
                keys = f"; keys {difference['example_keys']}" if difference.get("example_keys") else ""
                rows = f" [{difference['rows']} row(s)]" if difference.get("rows") else ""
                print(f"  {where}: {difference['what']}{rows}{keys}")
            for note in result.get("notes", []):
                print(f"  note: {note}")
            if result.get("error"):
                print(f"  error: {result['error']}")
        return {VerifyState.EQUAL.value: 0, VerifyState.DIFFERENT.value: 1}.get(result["state"], 2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        return VerifyCommand(argv[1:]).run()
    limit_malloc_arenas()
    parser = argparse.ArgumentParser(description="Milvus CDC server")
    parser.add_argument("-c", "--config", default="config.yaml", help="path of the YAML config (config.yaml)")
    args = parser.parse_args(argv)
    try:
        config, messages = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    apply_log_level(config.log_level)
    for level, text in messages:
        log.log(level, text)
    for what, etcd in (("sourceConfig.etcd", config.source.etcd), ("metaStoreConfig.etcd", config.meta_store.etcd)):
        problem = etcd.check_tls_floor() if etcd is not None else None
        if problem:
            print(f"config: {what}.tlsMinVersion: {problem}", file=sys.stderr)
            return 2
    try:
        store = open_meta_store(config.meta_store)
    except MetaStoreInUse as exc:
        print(exc, file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a trace
        print(f"meta store ({config.meta_store.store_type}) is not reachable: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    metrics = Metrics()
    store.metrics = metrics
    manager: TaskManager
    if config.cluster is not None:
        assert isinstance(store, LeaseStore)  # load_config takes a cluster only on a store type that has leases
        manager = ClusterTaskManager(config, store, store, metrics, config.cluster.server_id,
                                     config.cluster.lease_ttl)
    else:
        manager = TaskManager(config, store, metrics)
    import waitress
    try:
        server = waitress.create_server(CdcApi(manager, config.api_token).app, host=config.host, port=config.port,
                                        **WAITRESS_LIMITS)
    except OSError as exc:
        print(f"cannot listen on {config.host}:{config.port}: {exc.strerror}", file=sys.stderr)
        store.close()
        return 2

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    manager.restore()
    log.info("milvus-cdc %s serving POST /cdc on %s:%d (meta store: %s)", __version__, config.host,
             int(server.effective_port), config.meta_store.store_type)
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        log.info("shutting down: stopping tasks and saving their checkpoints")
        server.close()
        manager.shutdown()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
