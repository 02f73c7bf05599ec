#!/usr/bin/env python3
"""Milvus CDC: keeps a target Milvus in step with a source Milvus.

It reads the source's metadata from etcd and its changes from the message queue (Kafka or Pulsar), and writes
them to a target Milvus (``common.ttMsgEnabled: false``) over gRPC: DDL with ``MsgBase.replicateInfo``, data
through ``ReplicateMessage``. Tasks are managed through ``POST /cdc``.

    python milvus_cdc.py -c config.yaml

The module reads top-down in the order data flows: configuration, meta store, source metadata, MQ readers,
message rewrite, target writer, replication task, HTTP API, main.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import heapq
import json
import logging
import os
import queue
import re
import signal
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import yaml

log = logging.getLogger("milvus_cdc")

__version__ = "0.1.0"


###############################################################################
# Configuration ################################################################
###############################################################################

class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the key and what is wrong."""


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...]
    username: str = ""
    password: str = ""
    ca_cert: str = ""
    cert: str = ""
    key: str = ""
    tls: bool = False

    def client(self, timeout: float = 10.0):
        """A pyetcd client on the first endpoint (etcd forwards to the leader itself)."""
        import pyetcd
        host, port = split_host_port(self.endpoints[0], 2379)
        kwargs: dict[str, Any] = {"host": host, "port": port, "timeout": timeout}
        if self.enable_auth:
            kwargs.update(user=self.username, password=self.password)
        if self.tls:
            kwargs.update(ca_cert=self.ca_cert or None, cert_cert=self.cert or None, cert_key=self.key or None)
        return pyetcd.client(**kwargs)

    @property
    def enable_auth(self) -> bool:
        return bool(self.username)


@dataclass(frozen=True)
class MetaStoreSettings:
    store_type: str
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
    mq_type: str
    kafka: dict = field(default_factory=dict)
    pulsar: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicationSettings:
    checkpoint_interval: float = 0.2
    retry_timeout: float = 600.0
    retry_max_backoff: float = 10.0


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


class ConfigReader:
    """Reads one YAML mapping, checking each value it is asked for and remembering what it read.

    Every problem is reported with the dotted key, so the user knows which line of the file to fix.
    """

    MISSING = object()

    def __init__(self, data: Any, path: str = ""):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path or 'the file'} must be a mapping, got {type(data).__name__}")
        self.data, self.path, self.read_keys, self.children = data, path, set(), []

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def section(self, name: str) -> "ConfigReader":
        self.read_keys.add(name)
        child = ConfigReader(self.data.get(name), self.key(name))
        self.children.append(child)
        return child

    def value(self, name: str, kind: type, default: Any = MISSING, check: Callable[[Any], bool] | None = None,
              expect: str = "") -> Any:
        self.read_keys.add(name)
        raw = self.data.get(name)
        if raw is None:
            if default is self.MISSING:
                raise ConfigError(f"config: {self.key(name)} is required ({expect or kind.__name__})")
            return default
        try:
            value = self._convert(raw, kind)
        except (TypeError, ValueError):
            raise ConfigError(f"config: {self.key(name)} must be {expect or 'a ' + kind.__name__}, "
                              f"got {raw!r}") from None
        if check is not None and not check(value):
            raise ConfigError(f"config: {self.key(name)} must be {expect}, got {raw!r}")
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

    def unknown_keys(self) -> list[str]:
        found = [self.key(k) for k in self.data if k not in self.read_keys]
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


def _read_etcd(reader: ConfigReader, default_address: list[str] | None) -> EtcdSettings:
    address = reader.value("address", list, default_address, lambda v: len(v) > 0,
                           "a list of etcd endpoints like http://127.0.0.1:2379")
    for endpoint in address:
        try:
            split_host_port(endpoint, 2379)
        except ValueError:
            raise ConfigError(f"config: {reader.key('address')} has an endpoint that is not host:port: "
                              f"{endpoint!r}") from None
    auth = reader.value("enableAuth", bool, False)
    tls = reader.value("enableTLS", bool, False)
    settings = EtcdSettings(
        endpoints=tuple(address),
        username=reader.value("username", str, "") if auth else "",
        password=reader.value("password", str, "") if auth else "",
        tls=tls,
        cert=reader.value("tlsCertPath", str, ""), key=reader.value("tlsKeyPath", str, ""),
        ca_cert=reader.value("tlsCACertPath", str, ""))
    reader.value("tlsMinVersion", str, "1.3")
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


def load_config(path: str) -> tuple[ServerConfig, list[str]]:
    """Parse and check the config file; returns the config and warnings about keys it does not know."""
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
    log_level = root.value("logLevel", str, "info",
                           lambda v: v.upper() in ("DEBUG", "INFO", "WARNING", "WARN", "ERROR"),
                           "one of debug, info, warning, error")

    meta = root.section("metaStoreConfig")
    store_type = meta.value("storeType", str, "sqlite", lambda v: v in ("sqlite", "mysql", "etcd"),
                            "one of sqlite, mysql, etcd")
    root_path = meta.value("rootPath", str, "cdc", lambda v: bool(v.strip("/")), "a non-empty path like cdc")
    sqlite_path = meta.value("sqlitePath", str, "cdc_meta.db")
    mysql: dict = {}
    mysql_url = meta.value("mysqlSourceUrl", str, "")
    if store_type == "mysql":
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
    if store_type == "etcd":
        meta_etcd = _read_etcd(etcd_reader, ["http://127.0.0.1:2379"])
    else:
        etcd_reader.read_keys.update(etcd_reader.data)  # kept for a later switch of storeType; not an error
    meta_store = MetaStoreSettings(store_type, root_path.strip("/"), sqlite_path, mysql, meta_etcd)

    src = root.section("sourceConfig")
    src_etcd_reader = src.section("etcd")
    src_etcd = _read_etcd(src_etcd_reader, ["http://127.0.0.1:2379"])
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
    kafka, pulsar = {}, {}
    if kafka_reader.data:
        kafka = {"address": kafka_reader.value("address", str, expect="host:port of a Kafka broker"),
                 "sasl": {k: kafka_reader.section("sasl").value(k, str, "")
                          for k in ("mechanisms", "securityProtocol", "username", "password")}}
    if pulsar_reader.data:
        pulsar = {"address": pulsar_reader.value("address", str, expect="a pulsar:// URL"),
                  "webAddress": pulsar_reader.value("webAddress", str, ""),
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
    source = SourceSettings(
        etcd=src_etcd, root_path=(new_root or old_root or "by-dev").strip("/"),
        meta_sub_path=(new_meta or old_meta or "meta").strip("/"),
        default_partition_name=src.value("defaultPartitionName", str, "_default"),
        read_chan_len=read_chan_len,
        replicate_chan=src.value("replicateChan", str, "by-dev-replicate-msg", lambda v: bool(v), "a channel name"),
        mq_type="kafka" if kafka else "pulsar", kafka=kafka, pulsar=pulsar)

    rep = root.section("replication")
    replication = ReplicationSettings(
        checkpoint_interval=rep.value("checkpointInterval", float, 0.2, lambda v: 0.01 <= v <= 60,
                                      "a number of seconds from 0.01 to 60"),
        retry_timeout=rep.value("retryTimeout", float, 600.0, lambda v: v >= 0, "a number of seconds >= 0"),
        retry_max_backoff=rep.value("retryMaxBackoff", float, 10.0, lambda v: v > 0, "a number of seconds > 0"))
    level = {"WARN": "WARNING"}.get(log_level.upper(), log_level.upper())
    config = ServerConfig(host, port, max_task_num, max_name_length, level, meta_store, source, replication)
    return config, [f"config: unknown key {k} ignored" for k in root.unknown_keys()]


###############################################################################
# Meta store ###################################################################
###############################################################################

@dataclass(frozen=True, order=True)
class Checkpoint:
    """How far one source channel is replicated: the reader resumes after (or at) ``msg_id``, and every message
    of the channel with a timestamp at or below ``timestamp`` is already on the target."""
    channel: str
    msg_id: bytes
    timestamp: int
    resume: str = "after"  # "at" until the first message of a freshly started channel is confirmed

    def to_json(self) -> dict:
        return {"channel": self.channel, "msg_id": base64.b64encode(self.msg_id).decode(),
                "timestamp": self.timestamp, "resume": self.resume}

    @classmethod
    def from_json(cls, data: dict) -> "Checkpoint":
        return cls(data["channel"], base64.b64decode(data["msg_id"]), int(data["timestamp"]),
                   data.get("resume", "after"))


class MetaStore(ABC):
    """Where tasks and their checkpoints live. Each call is one atomic write or read.

    Layout, shared by every store: a task's info document under ``{rootPath}/task_info/{task_id}`` and all of
    its checkpoints, as one document, under ``{rootPath}/task_position/{task_id}``; ``rootPath`` lets several
    CDC servers share one store.
    """

    def __init__(self, root_path: str):
        self.root_path = root_path

    @abstractmethod
    def save_task(self, task_id: str, info: dict) -> None: ...

    @abstractmethod
    def load_tasks(self) -> dict[str, dict]: ...

    @abstractmethod
    def delete_task(self, task_id: str) -> None:
        """Remove the task and its checkpoints in one transaction."""

    @abstractmethod
    def _save_positions(self, task_id: str, document: str) -> None: ...

    @abstractmethod
    def _load_positions(self, task_id: str) -> str | None: ...

    @abstractmethod
    def close(self) -> None: ...

    def save_checkpoints(self, task_id: str, checkpoints: Iterable[Checkpoint]) -> None:
        """Replace the task's whole set of checkpoints in one write."""
        self._save_positions(task_id, json.dumps([c.to_json() for c in sorted(checkpoints)]))

    def load_checkpoints(self, task_id: str) -> dict[str, Checkpoint]:
        document = self._load_positions(task_id)
        if not document:
            return {}
        return {c.channel: c for c in map(Checkpoint.from_json, json.loads(document))}


class SqlMetaStore(MetaStore):
    """The SQL stores: tables ``task_info`` and ``task_position`` keyed by (root_path, task_id). Subclasses give
    the driver's transaction and dialect."""

    MARK = "%s"                  # the driver's parameter marker
    REPLACE = "REPLACE INTO"     # insert or overwrite by primary key
    TEXT = "LONGTEXT"
    KEY = "VARCHAR(255)"

    lock: threading.Lock

    @abstractmethod
    def _begin(self):
        """A cursor inside a new transaction (reconnecting first when the driver needs to)."""

    @abstractmethod
    def _end(self, cursor, commit: bool) -> None: ...

    @contextlib.contextmanager
    def _transaction(self):
        """A cursor whose statements commit together on success and roll back on error."""
        with self.lock:
            cursor = self._begin()
            try:
                yield cursor
                self._end(cursor, commit=True)
            except BaseException:
                self._end(cursor, commit=False)
                raise
            finally:
                cursor.close()

    def _create_tables(self) -> None:
        with self._transaction() as cur:
            cur.execute(f"CREATE TABLE IF NOT EXISTS task_info (root_path {self.KEY} NOT NULL, task_id {self.KEY} "
                        f"NOT NULL, info {self.TEXT} NOT NULL, PRIMARY KEY (root_path, task_id))")
            cur.execute(f"CREATE TABLE IF NOT EXISTS task_position (root_path {self.KEY} NOT NULL, task_id "
                        f"{self.KEY} NOT NULL, positions {self.TEXT} NOT NULL, PRIMARY KEY (root_path, task_id))")

    def _put(self, table: str, task_id: str, document: str) -> None:
        m = self.MARK
        with self._transaction() as cur:
            cur.execute(f"{self.REPLACE} {table} VALUES ({m}, {m}, {m})", (self.root_path, task_id, document))

    def save_task(self, task_id, info):
        self._put("task_info", task_id, json.dumps(info))

    def _save_positions(self, task_id, document):
        self._put("task_position", task_id, document)

    def load_tasks(self):
        with self._transaction() as cur:
            cur.execute(f"SELECT task_id, info FROM task_info WHERE root_path = {self.MARK}", (self.root_path,))
            return {task_id: json.loads(info) for task_id, info in cur.fetchall()}

    def _load_positions(self, task_id):
        m = self.MARK
        with self._transaction() as cur:
            cur.execute(f"SELECT positions FROM task_position WHERE root_path = {m} AND task_id = {m}",
                        (self.root_path, task_id))
            row = cur.fetchone()
        return row[0] if row else None

    def delete_task(self, task_id):
        m = self.MARK
        with self._transaction() as cur:
            for table in ("task_info", "task_position"):
                cur.execute(f"DELETE FROM {table} WHERE root_path = {m} AND task_id = {m}", (self.root_path, task_id))


class SqliteMetaStore(SqlMetaStore):
    """The embedded default: one local file, no server to run."""

    MARK, REPLACE, TEXT, KEY = "?", "INSERT OR REPLACE INTO", "TEXT", "TEXT"

    def __init__(self, path: str, root_path: str):
        super().__init__(root_path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=10000")
        self._create_tables()

    def _begin(self):
        cursor = self.db.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        return cursor

    def _end(self, cursor, commit):
        cursor.execute("COMMIT" if commit else "ROLLBACK")

    def close(self):
        with self.lock:
            self.db.close()


class MySQLMetaStore(SqlMetaStore):
    """MySQL or MariaDB through pymysql; creates its database and tables when they are missing."""

    def __init__(self, params: dict, root_path: str):
        import pymysql
        super().__init__(root_path)
        self.lock = threading.Lock()
        params = dict(params)
        database = params.pop("database")
        bootstrap = pymysql.connect(**params, connect_timeout=10)
        try:
            with bootstrap.cursor() as cur:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{database.replace('`', '``')}`")
        finally:
            bootstrap.close()
        self.connect = lambda: pymysql.connect(**params, database=database, connect_timeout=10, autocommit=False)
        self.conn = self.connect()
        self._create_tables()

    def _begin(self):
        import pymysql
        try:
            self.conn.ping()
        except pymysql.err.Error:  # the server restarted or dropped an idle connection
            self.conn = self.connect()
        return self.conn.cursor()

    def _end(self, cursor, commit):
        if commit:
            self.conn.commit()
        else:
            self.conn.rollback()

    def close(self):
        with self.lock:
            self.conn.close()


class EtcdMetaStore(MetaStore):
    """Keys under ``{rootPath}/task_info/`` and ``{rootPath}/task_position/`` of an etcd cluster."""

    def __init__(self, settings: EtcdSettings, root_path: str):
        super().__init__(root_path)
        self.client = settings.client()
        self.client.status()  # fail at start-up, not at the first request

    def _key(self, kind: str, task_id: str = "") -> str:
        return f"{self.root_path}/{kind}/{task_id}"

    def save_task(self, task_id, info):
        self.client.put(self._key("task_info", task_id), json.dumps(info))

    def load_tasks(self):
        prefix = self._key("task_info")
        return {meta.key.decode()[len(prefix):]: json.loads(value)
                for value, meta in self.client.get_prefix(prefix)}

    def delete_task(self, task_id):
        ops = self.client.transactions
        self.client.transaction(compare=[], success=[ops.delete(self._key("task_info", task_id)),
                                                     ops.delete(self._key("task_position", task_id))],
                                failure=[])

    def _save_positions(self, task_id, document):
        self.client.put(self._key("task_position", task_id), document)

    def _load_positions(self, task_id):
        value, _ = self.client.get(self._key("task_position", task_id))
        return value.decode() if value else None

    def close(self):
        self.client.close()


def open_meta_store(settings: MetaStoreSettings) -> MetaStore:
    if settings.store_type == "sqlite":
        return SqliteMetaStore(settings.sqlite_path, settings.root_path)
    if settings.store_type == "mysql":
        return MySQLMetaStore(settings.mysql, settings.root_path)
    return EtcdMetaStore(settings.etcd, settings.root_path)


###############################################################################
# Source metadata (etcd) #######################################################
###############################################################################

def _declare_etcd_messages() -> dict[str, type]:
    """Protobuf classes for the few Milvus-internal etcd values the CDC reads (not shipped by pymilvus).

    Only the fields used are declared; protobuf skips the others. Enums are read as int32 (same wire format).
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from pymilvus.grpc_gen import common_pb2, schema_pb2  # noqa: F401 - registers common.proto, schema.proto

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


ETCD_MESSAGES = _declare_etcd_messages()
COLLECTION_CREATED, COLLECTION_CREATING, COLLECTION_DROPPING, COLLECTION_DROPPED = 0, 1, 2, 3
PARTITION_CREATED = 0
LOAD_TYPE_PARTITION, LOAD_TYPE_COLLECTION = 1, 2
DEFAULT_DB = "default"
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


def pchannel_of(vchannel: str) -> str:
    return vchannel.rsplit("_", 1)[0]


class SourceMeta:
    """Reads databases, collections, partitions and load state from the source's etcd, and watches them."""

    WATCHED = ("root-coord/database/collection-info/", "root-coord/collection/", "root-coord/partitions/",
               "querycoord-partition-loadinfo/", "querycoord-collection-loadinfo/")

    def __init__(self, settings: SourceSettings):
        self.settings = settings
        self.prefix = f"{settings.root_path}/{settings.meta_sub_path}/"
        self.client = settings.etcd.client()
        self.watch_ids: list[int] = []

    def close(self) -> None:
        for watch_id in self.watch_ids:
            try:
                self.client.cancel_watch(watch_id)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        self.client.close()

    def _values(self, sub: str) -> list[tuple[str, bytes]]:
        return [(meta.key.decode(), value) for value, meta in self.client.get_prefix(self.prefix + sub)
                if value and value != ETCD_TOMBSTONE]

    def databases(self) -> dict[int, str]:
        names = {1: DEFAULT_DB}
        for _, value in self._values("root-coord/database/db-info/"):
            info = ETCD_MESSAGES["DatabaseInfo"].FromString(value)
            if info.state in (0, 1, 2):  # unknown, created, creating
                names[info.id] = info.name
        return names

    def collections(self) -> list[SourceCollection]:
        databases = self.databases()
        return [self._collection(ETCD_MESSAGES["CollectionInfo"].FromString(value), databases)
                for _, value in self._values("root-coord/database/collection-info/")
                + self._values("root-coord/collection/")]

    def live_pchannels(self, excluding: int = 0) -> set[str]:
        """The pchannels of every collection not dropped (read from the collection infos alone)."""
        channels: set[str] = set()
        for _, value in self._values("root-coord/database/collection-info/") + \
                self._values("root-coord/collection/"):
            info = ETCD_MESSAGES["CollectionInfo"].FromString(value)
            if info.ID != excluding and info.state not in (COLLECTION_DROPPING, COLLECTION_DROPPED):
                channels.update(info.physical_channel_names)
        return channels

    def collection(self, collection_id: int) -> SourceCollection | None:
        databases = None
        for key, value in self._values("root-coord/database/collection-info/") + \
                self._values("root-coord/collection/"):
            if key.endswith(f"/{collection_id}"):
                databases = databases or self.databases()
                return self._collection(ETCD_MESSAGES["CollectionInfo"].FromString(value), databases)
        return None

    def _collection(self, info, databases: dict[int, str]) -> SourceCollection:
        from pymilvus.grpc_gen import schema_pb2
        schema = schema_pb2.CollectionSchema()
        schema.CopyFrom(info.schema)
        fields = [schema_pb2.FieldSchema.FromString(v) for _, v in self._values(f"root-coord/fields/{info.ID}/")]
        if not fields:
            fields = list(info.schema.fields)  # collections from before fields had their own keys
        del schema.fields[:]
        schema.fields.extend(sorted((f for f in fields if f.fieldID >= 100), key=lambda f: f.fieldID))
        db_id = info.db_id or 1
        return SourceCollection(
            id=info.ID, name=info.schema.name, db_id=db_id, db_name=databases.get(db_id, DEFAULT_DB),
            schema=schema, shards_num=info.shards_num or len(info.virtual_channel_names),
            consistency_level=info.consistency_level,
            properties=[(p.key, p.value) for p in info.properties],
            vchannels=list(info.virtual_channel_names), pchannels=list(info.physical_channel_names),
            start_positions={p.key: p.data for p in info.start_positions},
            create_time=info.create_time, state=info.state)

    def partitions(self, collection_id: int) -> list[SourcePartition]:
        found = []
        for _, value in self._values(f"root-coord/partitions/{collection_id}/"):
            info = ETCD_MESSAGES["PartitionInfo"].FromString(value)
            found.append(SourcePartition(info.partitionID, info.partitionName, info.collection_id or collection_id,
                                         info.partition_created_timestamp, info.state))
        return found

    def indexes(self, collection: SourceCollection) -> list[tuple[str, str, list[tuple[str, str]], int]]:
        """(field name, index name, the user's index params, create time) of each live index."""
        fields = {f.fieldID: f.name for f in collection.schema.fields}
        found = []
        for _, value in self._values(f"field-index/{collection.id}/"):
            index = ETCD_MESSAGES["FieldIndex"].FromString(value)
            info = index.index_info
            if index.deleted or info.fieldID not in fields:
                continue
            params = info.user_index_params or info.index_params
            found.append((fields[info.fieldID], info.index_name, [(p.key, p.value) for p in params],
                          index.create_time))
        return sorted(found, key=lambda i: i[3])

    def load_state(self, collection_id: int) -> tuple[int, set[int]] | None:
        """(load type, loaded partition ids) of a loaded collection, None when it is not loaded."""
        value, _ = self.client.get(f"{self.prefix}querycoord-collection-loadinfo/{collection_id}")
        if not value or value == ETCD_TOMBSTONE:
            return None
        info = ETCD_MESSAGES["CollectionLoadInfo"].FromString(value)
        partitions = {ETCD_MESSAGES["PartitionLoadInfo"].FromString(v).partitionID
                      for _, v in self._values(f"querycoord-partition-loadinfo/{collection_id}/")}
        return info.load_type, partitions

    def watch(self, on_change: Callable[[str, str, bytes | None], None],
              on_error: Callable[[Exception], None], start_revision: int | None = None) -> None:
        """Call ``on_change(kind, key, value)`` for every change under the watched prefixes (value None on
        delete); ``kind`` is the watched prefix. Errors (the watch stream broke) go to ``on_error``."""
        import pyetcd.events

        def callback(kind: str, response) -> None:
            if isinstance(response, Exception):
                on_error(response)
                return
            for event in response.events:
                deleted = isinstance(event, pyetcd.events.DeleteEvent)
                value = None if deleted or event.value == ETCD_TOMBSTONE else event.value
                on_change(kind, event.key.decode(), value)

        for kind in self.WATCHED:
            kwargs = {"start_revision": start_revision} if start_revision else {}
            self.watch_ids.append(self.client.add_watch_prefix_callback(
                self.prefix + kind, lambda response, kind=kind: callback(kind, response), **kwargs))

    def current_revision(self) -> int:
        return self.client.get_prefix_response(self.prefix + "root-coord/database/db-info/",
                                               keys_only=True).header.revision


###############################################################################
# MQ readers ###################################################################
###############################################################################

@dataclass(frozen=True)
class SourceMessage:
    """One record of a source channel: its MQ id, its Milvus type and timestamp, and the raw protobuf bytes."""
    channel: str
    msg_id: bytes
    msg_type: int
    timestamp: int
    payload: bytes


@dataclass(frozen=True)
class StartAt:
    """Where a reader starts on a channel: ``after`` or ``at`` a message id, or at the ``latest`` / ``earliest``
    end of the channel."""
    kind: str
    msg_id: bytes = b""


LATEST, EARLIEST = StartAt("latest"), StartAt("earliest")


def decode_source_message(channel: str, msg_id: bytes, payload: bytes) -> SourceMessage:
    from pymilvus.grpc_gen import common_pb2, msg_pb2
    base = common_pb2.MsgHeader.FromString(payload).base
    timestamp = base.timestamp
    if base.msg_type in (common_pb2.Insert, common_pb2.Delete) and not timestamp:
        # An upsert's Insert half carries its time only per row.
        cls = msg_pb2.InsertRequest if base.msg_type == common_pb2.Insert else msg_pb2.DeleteRequest
        timestamp = max(cls.FromString(payload).timestamps, default=0)
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
    def close(self) -> None: ...


class KafkaChannelReader(ChannelReader):
    """kafka-python on partition 0 of each channel's topic; a message id is the offset, 8 bytes little-endian."""

    def __init__(self, settings: dict):
        from kafka import KafkaConsumer
        options: dict[str, Any] = {}
        sasl = settings.get("sasl") or {}
        if sasl.get("username"):
            options.update(security_protocol=sasl.get("securityProtocol") or "SASL_PLAINTEXT",
                           sasl_mechanism=sasl.get("mechanisms") or "PLAIN",
                           sasl_plain_username=sasl["username"], sasl_plain_password=sasl.get("password", ""))
        self.consumer = KafkaConsumer(bootstrap_servers=settings["address"].split(","), enable_auto_commit=False,
                                      group_id=None, fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20,
                                      request_timeout_ms=30000, **options)
        self.partitions: dict[str, Any] = {}

    @staticmethod
    def offset(msg_id: bytes) -> int:
        return struct.unpack("<q", msg_id[:8].ljust(8, b"\0"))[0]

    def resolve(self, channel, start):
        from kafka import TopicPartition
        if start.kind in ("after", "at"):
            return start
        partition = TopicPartition(channel, 0)
        if self.consumer.partitions_for_topic(channel) is None:
            offset = 0  # the topic does not exist yet: its first record will be offset 0
        elif start.kind == "latest":
            offset = self.consumer.end_offsets([partition])[partition]
        else:
            offset = self.consumer.beginning_offsets([partition])[partition]
        return StartAt("at", struct.pack("<q", offset))

    def earliest(self, msg_ids):
        return min(msg_ids, key=self.offset)

    def add(self, channel, start):
        from kafka import TopicPartition
        start = self.resolve(channel, start)
        partition = TopicPartition(channel, 0)
        self.partitions[channel] = partition
        self.consumer.assign(list(self.partitions.values()))
        self.consumer.seek(partition, self.offset(start.msg_id) + (start.kind == "after"))
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

    def close(self):
        self.consumer.close()


class PulsarChannelReader(ChannelReader):
    """pulsar-client readers on ``persistent://{tenant}/{namespace}/{channel}``; a message id is the serialized
    Pulsar MessageIdData, as Milvus stores it."""

    def __init__(self, settings: dict):
        import pulsar
        self.pulsar = pulsar
        options: dict[str, Any] = {"operation_timeout_seconds": 30, "logger": logging.getLogger("pulsar")}
        if settings.get("authPlugin"):
            options["authentication"] = pulsar.Authentication(settings["authPlugin"], settings.get("authParams", ""))
        self.client = pulsar.Client(settings["address"], **options)
        tenant, namespace = settings.get("tenant") or "public", settings.get("namespace") or "default"
        self.topic_prefix = f"persistent://{tenant}/{namespace}/"
        self.readers: dict[str, Any] = {}

    def resolve(self, channel, start):
        return start  # a Pulsar reader cannot name the latest message before it reads one

    def earliest(self, msg_ids):
        def order(msg_id: bytes):
            parsed = self.pulsar.MessageId.deserialize(msg_id)
            return parsed.ledger_id(), parsed.entry_id(), parsed.batch_index()
        return min(msg_ids, key=order)

    def add(self, channel, start):
        self.remove(channel)
        if start.kind == "latest":
            message_id, inclusive = self.pulsar.MessageId.latest, False
        elif start.kind == "earliest":
            message_id, inclusive = self.pulsar.MessageId.earliest, True
        else:
            message_id, inclusive = self.pulsar.MessageId.deserialize(start.msg_id), start.kind == "at"
        self.readers[channel] = self.client.create_reader(self.topic_prefix + channel, message_id,
                                                          start_message_id_inclusive=inclusive,
                                                          receiver_queue_size=1000)
        return start

    def remove(self, channel):
        reader = self.readers.pop(channel, None)
        if reader is not None:
            reader.close()

    def read(self, timeout):
        deadline = time.monotonic() + timeout
        messages: list[SourceMessage] = []
        while not messages and time.monotonic() < deadline:
            for channel, reader in list(self.readers.items()):
                # read_next with a short wait, not has_message_available: some brokers refuse the latter on
                # an empty topic.
                while len(messages) < 2000:
                    try:
                        msg = reader.read_next(timeout_millis=5)
                    except self.pulsar.Timeout:
                        break
                    messages.append(decode_source_message(channel, msg.message_id().serialize(), msg.data()))
            if not self.readers:
                time.sleep(max(0.0, deadline - time.monotonic()))
        return messages

    def close(self):
        for channel in list(self.readers):
            self.remove(channel)
        self.client.close()


def open_channel_reader(settings: SourceSettings) -> ChannelReader:
    if settings.mq_type == "kafka":
        return KafkaChannelReader(settings.kafka)
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

    @classmethod
    def drop_collection(cls, msg, target: TargetCollection) -> bytes:
        msg.collectionID, msg.db_name, msg.dbID = target.id, target.db_name, 0
        return msg.SerializeToString()

    @classmethod
    def drop_partition(cls, msg, target: TargetCollection, partition_id: int) -> bytes:
        msg.collectionID, msg.partitionID, msg.db_name, msg.dbID = target.id, partition_id, target.db_name, 0
        return msg.SerializeToString()

    @staticmethod
    def time_tick(timestamp: int) -> bytes:
        from pymilvus.grpc_gen import common_pb2, msg_pb2
        return msg_pb2.TimeTickMsg(base=common_pb2.MsgBase(msg_type=common_pb2.TimeTick, timestamp=timestamp,
                                                           msgID=timestamp)).SerializeToString()


###############################################################################
# Target writer ################################################################
###############################################################################

class TargetError(Exception):
    """A write to the target failed for good; the message names the operation and the target's answer."""


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
                   ("grpc.keepalive_time_ms", 30000)]
        if not self.secure:
            return grpc.insecure_channel(self.address, options=options)
        dial = dict(self.dial_config)

        def read(key):
            if not dial.get(key):
                return None
            with open(dial[key], "rb") as fh:
                return fh.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=read("server_pem_path") or read("ca_pem_path"),
                                                   private_key=read("client_key_path"),
                                                   certificate_chain=read("client_pem_path"))
        if dial.get("server_name"):
            options.append(("grpc.ssl_target_name_override", dial["server_name"]))
        return grpc.secure_channel(self.address, credentials, options=options)

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


def answer_says(status, *needles: str) -> bool:
    text = (status.reason + " " + status.detail).lower()
    return any(n in text for n in needles)


NOT_FOUND = ("not found", "not exist", "doesn't exist", "does not exist")
ALREADY_EXISTS = ("already exist", "duplicate")


class TargetWriter:
    """All calls to the target Milvus, over pymilvus's gRPC stubs, each retried with backoff.

    A call whose failure persists past the retry budget raises TargetError; the task then pauses with it as the
    reason. ``ok_if`` tells for each operation which refusals mean the work is already done (a replay).
    """

    def __init__(self, param: ConnectParam, settings: ReplicationSettings, stop: threading.Event, task_id: str):
        from pymilvus.grpc_gen import milvus_pb2_grpc
        self.param, self.settings, self.stop, self.task_id = param, settings, stop, task_id
        self.grpc_channel = param.channel()
        self.stub = milvus_pb2_grpc.MilvusServiceStub(self.grpc_channel)
        self.call_timeout = max(30.0, param.connect_timeout)

    def close(self) -> None:
        self.grpc_channel.close()

    def call(self, op: str, method: str, request, db_name: str = "", ok_if: Callable[[Any], bool] | None = None):
        import grpc
        import tenacity

        def attempt():
            if self.stop.is_set():
                raise TaskStopping()
            try:
                response = getattr(self.stub, method)(request, timeout=self.call_timeout,
                                                      metadata=self.param.metadata(db_name))
            except grpc.RpcError as exc:
                raise TargetError(f"{op}: {exc.code().name}: {exc.details()}") from None
            status = status_of(response)
            if status_ok(status) or (ok_if is not None and ok_if(status)):
                return response
            raise TargetError(f"{op}: {status_text(status)}")

        def log_retry(state):
            log.warning("task=%s retrying %s (attempt %d): %s", self.task_id, op, state.attempt_number,
                        state.outcome.exception())

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TargetError),
            stop=tenacity.stop_after_delay(self.settings.retry_timeout),
            wait=tenacity.wait_exponential(multiplier=0.5, min=0.2, max=self.settings.retry_max_backoff),
            sleep=self._sleep, before_sleep=log_retry, reraise=True)
        return retrying(attempt)

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise TaskStopping()

    @staticmethod
    def base(msg_type: int, timestamp: int):
        from pymilvus.grpc_gen import common_pb2
        return common_pb2.MsgBase(msg_type=msg_type, replicateInfo=common_pb2.ReplicateInfo(
            isReplicate=True, msgTimestamp=timestamp))

    # -- reads --------------------------------------------------------------------------------------------

    def describe_collection(self, db_name: str, name: str) -> TargetCollection | None:
        from pymilvus.grpc_gen import milvus_pb2
        response = self.call(f"describe collection {db_name}.{name}", "DescribeCollection",
                             milvus_pb2.DescribeCollectionRequest(db_name=db_name, collection_name=name),
                             db_name, ok_if=lambda s: answer_says(s, *NOT_FOUND) or s.code == 100)
        if not status_ok(response.status):
            return None
        partitions = self.call(f"show partitions of {db_name}.{name}", "ShowPartitions",
                               milvus_pb2.ShowPartitionsRequest(db_name=db_name, collection_name=name), db_name)
        vchannels = sorted(response.virtual_channel_names, key=shard_index)
        return TargetCollection(
            id=response.collectionID, db_name=db_name, name=name, created_ts=response.created_timestamp,
            vchannels=vchannels, fields={f.name: f.fieldID for f in response.schema.fields},
            partitions=dict(zip(partitions.partition_names, partitions.partitionIDs, strict=True)))

    def databases(self) -> list[str]:
        from pymilvus.grpc_gen import milvus_pb2
        return list(self.call("list databases", "ListDatabases", milvus_pb2.ListDatabasesRequest()).db_names)

    def collection_names(self, db_name: str) -> list[str]:
        from pymilvus.grpc_gen import milvus_pb2
        return list(self.call(f"list collections of {db_name}", "ShowCollections",
                              milvus_pb2.ShowCollectionsRequest(db_name=db_name), db_name).collection_names)

    def loaded_partitions(self, db_name: str, name: str) -> set[str]:
        from pymilvus.grpc_gen import milvus_pb2
        response = self.call(f"show loaded partitions of {db_name}.{name}", "ShowPartitions",
                             milvus_pb2.ShowPartitionsRequest(db_name=db_name, collection_name=name,
                                                              type=milvus_pb2.InMemory),
                             db_name, ok_if=lambda s: answer_says(s, "not loaded", *NOT_FOUND))
        return set(response.partition_names) if status_ok(response.status) else set()

    # -- writes -------------------------------------------------------------------------------------------

    def replicate(self, pchannel: str, messages: list[bytes]) -> None:
        from pymilvus.grpc_gen import milvus_pb2
        # One request per ~16 MB keeps every call far below gRPC's and the target MQ's message limits.
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


class TaskStopping(Exception):
    """The task is being paused, deleted or shut down while a call waited; not an error."""


def probe_target(param: ConnectParam) -> str | None:
    """One quick look at a would-be target: None when it is reachable and accepts replication, else why not."""
    import grpc
    from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc
    try:
        channel = param.channel()
    except OSError as exc:
        return f"cannot read a dial_config file: {exc}"
    try:
        stub = milvus_pb2_grpc.MilvusServiceStub(channel)
        timeout = max(param.connect_timeout, 0.5)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            answer = stub.ReplicateMessage(milvus_pb2.ReplicateMessageRequest(channel_name=""), timeout=timeout,
                                           metadata=param.metadata())
        except grpc.FutureTimeoutError:
            return f"cannot reach the target Milvus at {param.uri} within {timeout:g}s"
        except grpc.RpcError as exc:
            return f"the target Milvus at {param.uri} did not answer: {exc.code().name}: {exc.details()}"
        if answer.status.code == 1900:
            return (f"the target Milvus at {param.uri} has common.ttMsgEnabled=true; set it to false in its "
                    f"milvus.yaml so it accepts replication")
        if answer.status.code == 1100 or status_ok(answer.status):
            return None  # 1100: the empty channel name was refused, after the ttMsgEnabled check passed
        if answer_says(answer.status, "auth", "credential", "permission", "privilege"):
            return f"the target Milvus at {param.uri} refused the token: {status_text(answer.status)}"
        return f"the target Milvus at {param.uri} refused replication: {status_text(answer.status)}"
    finally:
        channel.close()


###############################################################################
# Replication task #############################################################
###############################################################################

TS_LOGICAL_BITS = 18


def hybrid_now() -> int:
    return int(time.time() * 1000) << TS_LOGICAL_BITS


def ts_seconds(ts: int) -> float:
    return (ts >> TS_LOGICAL_BITS) / 1000.0


def channel_lag(channel: str, confirmed_ts: int, now: float) -> dict:
    """How far a source channel is confirmed on the target, as `get` shows it."""
    return {"channel": channel, "confirmed_ts": confirmed_ts,
            "confirmed_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_seconds(confirmed_ts)))
            if confirmed_ts else None,
            "lag_seconds": round(max(0.0, now - ts_seconds(confirmed_ts)), 3) if confirmed_ts else None}


class TaskState:
    INITIAL, RUNNING, PAUSED = "Initial", "Running", "Paused"


class CollectionFilter:
    """Which collections a task replicates: ``*`` for all, else names (``name`` in the default database or
    ``db.name``)."""

    def __init__(self, names: list[str]):
        self.everything = names == ["*"]
        self.names = set() if self.everything else {n if "." in n else f"{DEFAULT_DB}.{n}" for n in names}

    def matches(self, db_name: str, name: str) -> bool:
        return self.everything or f"{db_name or DEFAULT_DB}.{name}" in self.names

    def overlaps(self, other: "CollectionFilter") -> bool:
        return self.everything or other.everything or bool(self.names & other.names)


@dataclass
class TaskInfo:
    """A task as stored in the meta store. The token lives here and nowhere the API shows."""
    task_id: str
    connect: ConnectParam
    collection_infos: list[dict]
    state: str = TaskState.INITIAL
    reason: str = ""
    replay_existing: bool = False
    created_at: float = field(default_factory=time.time)

    @property
    def filter(self) -> CollectionFilter:
        return CollectionFilter([c["name"] for c in self.collection_infos])

    def to_store(self) -> dict:
        return {"task_id": self.task_id, "milvus_connect_param": self.connect_json(secrets=True),
                "collection_infos": self.collection_infos, "state": self.state, "reason": self.reason,
                "replay_existing": self.replay_existing, "created_at": self.created_at}

    @classmethod
    def from_store(cls, data: dict) -> "TaskInfo":
        param = data["milvus_connect_param"]
        connect = ConnectParam(uri=param["uri"], token=param.get("token", ""),
                               connect_timeout=float(param.get("connect_timeout", 10)),
                               dial_config=tuple(sorted((param.get("dial_config") or {}).items())))
        return cls(task_id=data["task_id"], connect=connect, collection_infos=data["collection_infos"],
                   state=data.get("state", TaskState.INITIAL), reason=data.get("reason", ""),
                   replay_existing=bool(data.get("replay_existing")), created_at=data.get("created_at", 0))

    def connect_json(self, secrets: bool = False) -> dict:
        shown: dict[str, Any] = {"uri": self.connect.uri, "connect_timeout": self.connect.connect_timeout}
        if self.connect.dial_config:
            shown["dial_config"] = dict(self.connect.dial_config)
        if secrets and self.connect.token:
            shown["token"] = self.connect.token
        return shown

    def public(self) -> dict:
        shown = {"task_id": self.task_id, "milvus_connect_param": self.connect_json(),
                 "collection_infos": self.collection_infos, "state": self.state}
        if self.reason:
            shown["reason"] = self.reason
        if self.replay_existing:
            shown["replay_existing"] = True
        return shown


class TargetClock:
    """Time ticks for one target Milvus, shared by every task writing to it.

    The target makes no ticks of its own: its data becomes visible, and its datanode moves on, only as ticks
    arrive on every pchannel that hosts a collection. A tick on a channel never goes backwards and never passes
    the durable checkpoint of any task writing to that target, so a task that restarts after a crash re-sends
    its unconfirmed messages into the same open tick window, where the target drops them as repeats.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.watermarks: dict[str, int] = {}
        self.channels: set[str] = set()
        self.sent: dict[str, int] = {}

    def join(self, task_id: str, watermark: int) -> None:
        with self.lock:
            self.watermarks[task_id] = watermark

    def leave(self, task_id: str) -> None:
        with self.lock:
            self.watermarks.pop(task_id, None)

    def add_channels(self, pchannels: Iterable[str]) -> None:
        with self.lock:
            self.channels.update(pchannels)

    def advance(self, task_id: str, watermark: int, writer: TargetWriter) -> None:
        """Tick every channel up to the lowest durable watermark of the tasks writing to this target."""
        with self.lock:
            self.watermarks[task_id] = watermark
            tick = min(self.watermarks.values())
            for pchannel in sorted(self.channels):
                if tick > self.sent.get(pchannel, 0):
                    writer.replicate(pchannel, [MessageRewriter.time_tick(tick)])
                    self.sent[pchannel] = tick


@dataclass
class ChannelProgress:
    """The applier's view of one source channel: what is read but not yet applied, and where to resume.

    A tick T only promises that no message at or below T follows it; a message above T may come before it.
    So a restart resumes at the first message not yet applied (or after the last one read), and skips what it
    reads again at or below the durable watermark.
    """
    name: str
    is_replicate: bool
    skip_until: int = 0                      # messages at or below were applied before a restart
    tick_ts: int | None = None               # latest source time tick read
    pending: list[SourceMessage] = field(default_factory=list)
    last_read: StartAt | None = None         # after the last message read, or the start position
    confirmed_ts: int = 0

    def resume(self) -> StartAt | None:
        return StartAt("at", self.pending[0].msg_id) if self.pending else self.last_read

    def checkpoint(self, watermark: int) -> Checkpoint | None:
        resume = self.resume()
        return Checkpoint(self.name, resume.msg_id, watermark, resume.kind) if resume else None


@dataclass(order=True)
class MetaEvent:
    """A change seen in the source's etcd, ordered among the MQ messages by a source timestamp."""
    ts: int
    seq: int
    kind: str = field(compare=False)
    collection_id: int = field(compare=False, default=0)
    partition_id: int = field(compare=False, default=0)


class Replicator:
    """One running task: a reader thread feeds a bounded queue (``readChanLen`` batches), an applier thread
    merges the source channels in timestamp order and writes to the target; etcd watch callbacks feed the
    applier's event queue. The task owns its threads and stops them on pause, delete and shutdown."""

    def __init__(self, task: TaskInfo, config: ServerConfig, store: MetaStore, clock: TargetClock,
                 on_failure: Callable[["Replicator", str], None]):
        self.task, self.config, self.store, self.clock = task, config, store, clock
        self.on_failure = on_failure
        self.log = log
        self.stop_event = threading.Event()
        self.read_queue: queue.Queue = queue.Queue(maxsize=config.source.read_chan_len)
        self.reader_commands: queue.SimpleQueue = queue.SimpleQueue()
        self.meta_changes: queue.SimpleQueue = queue.SimpleQueue()
        self.status_lock = threading.Lock()
        self.status: dict[str, Any] = {"channels": {}}
        self.threads: list[threading.Thread] = []
        self.started = threading.Event()  # set once the start positions are pinned in the meta store
        self.failed = False

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        applier = threading.Thread(target=self._run_applier, name=f"cdc-apply-{self.task.task_id[:8]}",
                                   daemon=True)
        self.threads.append(applier)
        applier.start()

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        joined: set[threading.Thread] = set()
        while unjoined := [t for t in self.threads if t not in joined and t is not threading.current_thread()]:
            for thread in unjoined:  # the applier may still add the reader thread while it stops
                thread.join(timeout)
                joined.add(thread)

    def lag(self) -> list[dict]:
        with self.status_lock:
            channels = dict(self.status["channels"])
        now = time.time()
        return [channel_lag(name, ts, now) for name, ts in sorted(channels.items())]

    def _fail(self, reason: str) -> None:
        if not self.stop_event.is_set():
            self.failed = True
            self.stop_event.set()
            self.log.error("task=%s paused by an error: %s", self.task.task_id, reason)
            # Recorded from a thread of its own: a pause or delete holding the manager's lock may be joining
            # this very thread.
            threading.Thread(target=self.on_failure, args=(self, reason), daemon=True).start()

    # -- reader thread ------------------------------------------------------------------------------------

    def _run_reader(self, reader: ChannelReader) -> None:
        try:
            while not self.stop_event.is_set():
                while True:
                    try:
                        command, channel, start = self.reader_commands.get_nowait()
                    except queue.Empty:
                        break
                    if command == "add":
                        reader.add(channel, start)
                    else:
                        reader.remove(channel)
                messages = reader.read(0.1)
                while messages and not self.stop_event.is_set():
                    try:
                        self.read_queue.put(messages, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as exc:  # noqa: BLE001 - any reader failure pauses the task with its text
            self._fail(f"reading the source MQ: {type(exc).__name__}: {exc}")
        finally:
            try:
                reader.close()
            except Exception:  # noqa: BLE001
                pass

    # -- applier thread -----------------------------------------------------------------------------------

    def _run_applier(self) -> None:
        task_id = self.task.task_id
        meta = writer = None
        try:
            meta = SourceMeta(self.config.source)
            writer = TargetWriter(self.task.connect, self.config.replication, self.stop_event, task_id)
            apply = Applier(self, meta, writer)
            apply.run()
        except TaskStopping:
            pass
        except TargetError as exc:
            self._fail(f"writing to the target: {exc}")
        except Exception as exc:  # noqa: BLE001 - the reason is shown to the user, the trace goes to the log
            self.log.exception("task=%s applier failed", task_id)
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self.clock.leave(task_id)
            for closable in (meta, writer):
                if closable is not None:
                    try:
                        closable.close()
                    except Exception:  # noqa: BLE001
                        pass


class Applier:
    """The applier thread's state and steps (see Replicator). Everything here runs on that one thread."""

    def __init__(self, replicator: Replicator, meta: SourceMeta, writer: TargetWriter):
        self.r, self.meta, self.writer = replicator, meta, writer
        self.task, self.log, self.stop = replicator.task, replicator.log, replicator.stop_event
        self.filter = self.task.filter
        self.settings = replicator.config.source
        self.channels: dict[str, ChannelProgress] = {}
        self.events: list[MetaEvent] = []
        self.event_seq = 0
        self.sources: dict[int, SourceCollection | None] = {}   # source collection id -> replicated one, or None
        self.targets: dict[int, TargetCollection] = {}          # source collection id -> its target copy
        self.drops: dict[tuple, dict[str, bytes]] = defaultdict(dict)
        self.outbox: dict[str, list[bytes]] = defaultdict(list)
        self.load_types: dict[int, int] = {}                     # collection id -> how the source loaded it
        self.existing: set[int] = set()                          # collections copied as they are at start
        self.applied = 0
        self.durable = 0
        self.last_checkpoint = 0.0
        self.checkpoint_dirty = False
        self.reader_thread: threading.Thread | None = None

    @property
    def tid(self) -> str:
        return self.task.task_id

    # -- start ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        saved = self.r.store.load_checkpoints(self.tid)
        self.durable = self.applied = max((c.timestamp for c in saved.values()), default=0)
        self.r.clock.join(self.tid, self.durable)
        self.r.clock.add_channels(self._target_pchannels())
        reader = open_channel_reader(self.settings)
        try:
            revision, starts = self._plan_starts(saved, reader)
            for name, start in starts.items():
                self._add_channel(name, name == self.settings.replicate_chan, start, reader)
        except BaseException:
            reader.close()
            raise
        # Pinned before create answers: what the user does next is replicated, even across a crash.
        self.checkpoint_dirty = True
        self._save_checkpoint(force=True)
        self.log.info("task=%s started: %d collection(s), %d channel(s), resuming at ts %d", self.tid,
                      len([c for c in self.sources.values() if c]), len(self.channels), self.durable)
        self.meta.watch(self._on_meta_change, self._on_watch_error, start_revision=revision + 1)
        self.reader_thread = threading.Thread(target=self.r._run_reader, args=(reader,),
                                              name=f"cdc-read-{self.tid[:8]}", daemon=True)
        self.r.threads.append(self.reader_thread)
        self.reader_thread.start()
        self.r.started.set()
        try:
            self._loop()
        finally:
            if not self.r.failed:
                self._save_checkpoint(force=True)

    def _live_collections(self) -> list[SourceCollection]:
        return [c for c in self.meta.collections() if not c.dropped and self.filter.matches(c.db_name, c.name)]

    def _plan_starts(self, saved: dict[str, Checkpoint], reader: ChannelReader) -> tuple[int, dict[str, StartAt]]:
        """Where each channel starts, and the etcd revision the watch continues from.

        A channel with a checkpoint resumes there. Otherwise a fresh task starts at the latest offsets, pinned
        before the collections are listed, so that nothing created meanwhile slips between listing and
        reading; a collection that is new since then (or since the last checkpoint, or any collection when
        replay_existing is set) starts at its own start position.
        """
        replicate = self.settings.replicate_chan
        before = self._live_collections()
        pins: dict[str, StartAt] = {}
        if not saved and not self.task.replay_existing:
            for channel in {replicate} | {p for c in before for p in c.pchannels}:
                pins[channel] = reader.resolve(channel, LATEST)
        if self.filter.everything and not saved:
            for db_name in sorted(set(self.meta.databases().values()) - {DEFAULT_DB}):
                self._create_database(db_name, hybrid_now())
        revision = self.meta.current_revision()
        live = self._live_collections()
        old = {c.id for c in before}
        if not saved and not self.task.replay_existing:
            self.existing = old
        for collection in live:
            self.sources[collection.id] = collection
            self._schedule(collection.create_time, "collection", collection.id)

        def resumed(channel: str) -> StartAt | None:
            checkpoint = saved.get(channel)
            return StartAt(checkpoint.resume, checkpoint.msg_id) if checkpoint else None

        starts = {replicate: resumed(replicate) or pins.get(replicate) or EARLIEST}
        for channel in sorted({p for c in live for p in c.pchannels}):
            if resumed(channel):
                starts[channel] = resumed(channel)
                continue
            newcomers = [c for c in live if channel in c.pchannels and (saved or self.task.replay_existing
                                                                        or c.id not in old)]
            ids = [c.start_positions[channel] for c in newcomers if channel in c.start_positions]
            if channel in pins and pins[channel].kind == "at":
                ids.append(pins[channel].msg_id)
            starts[channel] = StartAt("at", reader.earliest(ids)) if ids else pins.get(channel, LATEST)
        return revision, starts

    def _add_channel(self, name: str, is_replicate: bool, start: StartAt,
                     reader: ChannelReader | None = None) -> None:
        progress = ChannelProgress(name, is_replicate, skip_until=self.durable)
        if reader is not None:
            start = reader.add(name, start)  # at start-up, before the reader thread owns the reader
        else:
            self.r.reader_commands.put(("add", name, start))
        if start.kind in ("after", "at"):
            progress.last_read = start
        self.channels[name] = progress
        self.log.info("task=%s reading %s from %s", self.tid, name,
                      start.kind if not start.msg_id else f"{start.kind} {start.msg_id.hex()}")

    def _remove_channel(self, name: str) -> None:
        if self.channels.pop(name, None) is not None:
            self.r.reader_commands.put(("remove", name, None))
            self.log.info("task=%s stopped reading %s: no replicated collection left on it", self.tid, name)

    def _target_pchannels(self) -> set[str]:
        """Every pchannel of every collection on the target: all of them need ticks."""
        found = set()
        for db_name in self.writer.databases():
            for name in self.writer.collection_names(db_name):
                described = self.writer.describe_collection(db_name, name)
                if described is not None:
                    found.update(described.pchannels)
        return found

    # -- main loop ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        interval = self.r.config.replication.checkpoint_interval
        while not self.stop.is_set():
            try:
                batch = self.r.read_queue.get(timeout=min(0.05, interval))
            except queue.Empty:
                batch = []
            for message in batch:
                self._accept(message)
            self._drain_meta_changes()
            self._advance()
            self._save_checkpoint()

    def _accept(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import common_pb2
        channel = self.channels.get(message.channel)
        if channel is None:
            return
        channel.last_read = StartAt("after", message.msg_id)
        if message.msg_type == common_pb2.TimeTick:
            channel.tick_ts = message.timestamp
            return
        if message.timestamp > channel.skip_until:
            channel.pending.append(message)
        if message.msg_type == common_pb2.DropCollection and self._last_on_channel(message):
            # The source stops ticking a channel with no collection left, possibly before a tick passes the
            # drop; nothing can follow the drop there, so it stands for the channel's final tick.
            channel.tick_ts = max(channel.tick_ts or 0, message.timestamp)

    def _last_on_channel(self, message: SourceMessage) -> bool:
        from pymilvus.grpc_gen import msg_pb2
        dropped = msg_pb2.DropCollectionRequest.FromString(message.payload).collectionID
        return message.channel not in self.meta.live_pchannels(excluding=dropped)

    def _watermark(self) -> int:
        """Every source message at or below the watermark has been read, on every channel."""
        dml = [c for c in self.channels.values() if not c.is_replicate]
        if dml:
            if any(c.tick_ts is None for c in dml):
                return self.applied
            return max(self.applied, min(c.tick_ts for c in dml))
        # With no data channel, nothing orders the replicate channel's operations but their own times.
        pending = [m.timestamp for c in self.channels.values() for m in c.pending] + [e.ts for e in self.events]
        return max([self.applied] + pending)

    def _advance(self) -> None:
        """Apply, in timestamp order, every message and etcd change at or below the watermark."""
        watermark = self._watermark()
        ready: list[tuple[int, int, int, Any]] = []
        for channel in self.channels.values():
            for message in channel.pending:
                if message.timestamp <= watermark:
                    ready.append((message.timestamp, 2 if channel.is_replicate else 1, len(ready), message))
        events = []
        while self.events and self.events[0].ts <= watermark:
            events.append(heapq.heappop(self.events))
        ready += [(event.ts, 0, len(ready) + i, event) for i, event in enumerate(events)]
        ready.sort(key=lambda item: item[:3])
        try:
            for _, _, _, item in ready:
                if self.stop.is_set():
                    raise TaskStopping()
                if isinstance(item, MetaEvent):
                    self._apply_event(item)
                else:
                    self._apply_message(item)
            self._flush_outbox()
        except BaseException:
            for event in events:  # a stop between two steps leaves the buffers as they were: nothing is lost
                heapq.heappush(self.events, event)
            raise
        # Only now, with all of them on the target, do the messages leave the buffers.
        if watermark > self.applied or ready:
            for channel in self.channels.values():
                channel.pending = [m for m in channel.pending if m.timestamp > watermark]
                channel.confirmed_ts = watermark
            self.applied = watermark
            self.checkpoint_dirty = True

    def _save_checkpoint(self, force: bool = False) -> None:
        """Persist the checkpoints (at most once per checkpointInterval), then tick the target up to them."""
        now = time.monotonic()
        if not self.checkpoint_dirty or (not force and now - self.last_checkpoint < self.r.config.replication
                                         .checkpoint_interval):
            return
        checkpoints = [c.checkpoint(self.applied) for c in self.channels.values()]
        self.r.store.save_checkpoints(self.tid, [c for c in checkpoints if c is not None])
        self.durable, self.checkpoint_dirty, self.last_checkpoint = self.applied, False, now
        self.log.debug("task=%s checkpoint at ts %d (%.3fs behind)", self.tid, self.durable,
                       time.time() - ts_seconds(self.durable))
        with self.r.status_lock:
            self.r.status["channels"] = {c.name: c.confirmed_ts for c in self.channels.values()}
        if not force:
            self.r.clock.advance(self.tid, self.durable, self.writer)

    # -- etcd changes -----------------------------------------------------------------------------------------

    def _on_meta_change(self, kind: str, key: str, value: bytes | None) -> None:
        self.r.meta_changes.put((kind, key, value))

    def _on_watch_error(self, error: Exception) -> None:
        self.r.meta_changes.put(("error", repr(error), None))

    def _schedule(self, ts: int, kind: str, collection_id: int, partition_id: int = 0) -> None:
        self.event_seq += 1
        heapq.heappush(self.events, MetaEvent(ts, self.event_seq, kind, collection_id, partition_id))

    def _drain_meta_changes(self) -> None:
        while True:
            try:
                kind, key, value = self.r.meta_changes.get_nowait()
            except queue.Empty:
                return
            if kind == "error":
                raise RuntimeError(f"the source etcd watch broke: {key}")
            ids = [int(part) for part in key.rsplit("/", 2)[-2:] if part.isdigit()]
            if kind in ("root-coord/database/collection-info/", "root-coord/collection/") and value:
                info = ETCD_MESSAGES["CollectionInfo"].FromString(value)
                if info.state == COLLECTION_CREATED:
                    self.sources.pop(info.ID, None)
                    self._schedule(info.create_time, "collection", info.ID)
            elif kind == "root-coord/partitions/" and value:
                info = ETCD_MESSAGES["PartitionInfo"].FromString(value)
                if info.state == PARTITION_CREATED:
                    self._schedule(info.partition_created_timestamp, "partition", info.collection_id or ids[0],
                                   info.partitionID)
            elif kind.startswith("querycoord-") and ids:
                collection_id = ids[0] if kind == "querycoord-partition-loadinfo/" else ids[-1]
                # Load state carries no source time: order it by the clock, after what the source did before.
                self._schedule(hybrid_now(), "load", collection_id)

    def _apply_event(self, event: MetaEvent) -> None:
        if event.kind == "collection":
            self._addressed(event.collection_id, refresh=True)
        elif event.kind == "partition":
            addressed = self._addressed(event.collection_id)
            if addressed is not None:
                source, target = addressed
                for partition in self.meta.partitions(source.id):
                    if partition.id == event.partition_id and partition.state == PARTITION_CREATED:
                        self._ensure_partition(source, target, partition.name)
        elif event.kind == "load":
            self._sync_partition_load(event.collection_id)

    # -- source and target collections ------------------------------------------------------------------------

    def _source(self, collection_id: int, refresh: bool = False) -> SourceCollection | None:
        if refresh or collection_id not in self.sources:
            found = self.meta.collection(collection_id)
            if found is not None and not self.filter.matches(found.db_name, found.name):
                found = None
            self.sources[collection_id] = found
        return self.sources[collection_id]

    def _source_by_name(self, db_name: str, name: str, ts: int) -> SourceCollection | None:
        """The source collection that had this name at time ``ts``."""
        if not self.filter.matches(db_name, name):
            return None
        candidates = [c for c in self.sources.values() if c is not None and c.db_name == db_name
                      and c.name == name and c.create_time <= ts]
        if not candidates:
            for found in self.meta.collections():
                if found.db_name == db_name and found.name == name and found.create_time <= ts:
                    self.sources[found.id] = found
                    candidates.append(found)
        return max(candidates, key=lambda c: c.create_time) if candidates else None

    def _create_database(self, db_name: str, ts: int) -> None:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        self.writer.call(f"create database {db_name}", "CreateDatabase", milvus_pb2.CreateDatabaseRequest(
            base=self.writer.base(common_pb2.CreateDatabase, ts), db_name=db_name),
            ok_if=lambda s: answer_says(s, *ALREADY_EXISTS))

    def _ensure_target(self, source: SourceCollection) -> TargetCollection:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        known = self.targets.get(source.id)
        if known is not None:
            return known
        target = self.writer.describe_collection(source.db_name, source.name)
        if target is not None and target.created_ts != source.create_time:
            raise TargetError(f"the target already has collection {source.qualified_name} (created at ts "
                              f"{target.created_ts}), but not as a copy of the source's (created at ts "
                              f"{source.create_time}); drop it on the target or leave it out of the task")
        if target is None:
            if source.db_name != DEFAULT_DB:
                self._create_database(source.db_name, source.create_time)
            request = milvus_pb2.CreateCollectionRequest(
                base=self.writer.base(common_pb2.CreateCollection, source.create_time),
                db_name=source.db_name, collection_name=source.name,
                schema=self._target_schema(source).SerializeToString(), shards_num=source.shards_num,
                consistency_level=source.consistency_level,
                properties=[common_pb2.KeyValuePair(key=k, value=v) for k, v in source.properties])
            partitions = [p for p in self.meta.partitions(source.id) if p.state == PARTITION_CREATED]
            if source.has_partition_key():
                request.num_partitions = len(partitions)
            self.writer.call(f"create collection {source.qualified_name}", "CreateCollection", request,
                             source.db_name)
            target = self.writer.describe_collection(source.db_name, source.name)
            if target is None:
                raise TargetError(f"collection {source.qualified_name} is missing on the target right after "
                                  f"its creation")
            if not source.has_partition_key():
                for partition in partitions:
                    self._ensure_partition(source, target, partition.name)
            self.log.info("task=%s created collection %s on the target (source id %d, target id %d)", self.tid,
                          source.qualified_name, source.id, target.id)
            self.targets[source.id] = target
            self.r.clock.add_channels(target.pchannels)
            if source.id in self.existing:
                self._copy_indexes_and_load(source)
        self.targets[source.id] = target
        self.r.clock.add_channels(target.pchannels)
        self._follow(source)
        return target

    def _follow(self, source: SourceCollection) -> None:
        """Read the channels of a collection that has a copy on the target, until its drop is applied."""
        for pchannel in source.pchannels:
            if pchannel not in self.channels:
                start = source.start_positions.get(pchannel)
                self._add_channel(pchannel, False, StartAt("at", start) if start else LATEST)

    def _copy_indexes_and_load(self, source: SourceCollection) -> None:
        """A collection that existed before the task, whose history the task does not read, comes over as it is
        now: its indexes, and loaded if the source has it loaded."""
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        for field_name, index_name, params, created in self.meta.indexes(source):
            self.writer.call(f"create index {index_name} of {source.qualified_name}", "CreateIndex",
                             milvus_pb2.CreateIndexRequest(
                                 base=self.writer.base(common_pb2.CreateIndex, created), db_name=source.db_name,
                                 collection_name=source.name, field_name=field_name, index_name=index_name,
                                 extra_params=[common_pb2.KeyValuePair(key=k, value=v) for k, v in params]),
                             source.db_name, ok_if=lambda s: answer_says(s, *ALREADY_EXISTS))
        state = self.meta.load_state(source.id)
        if state is None:
            return
        self.load_types[source.id] = state[0]
        if state[0] == LOAD_TYPE_PARTITION:
            self._sync_partition_load(source.id)
        else:
            self.writer.call(f"load collection {source.qualified_name}", "LoadCollection",
                             milvus_pb2.LoadCollectionRequest(
                                 base=self.writer.base(common_pb2.LoadCollection, hybrid_now()),
                                 db_name=source.db_name, collection_name=source.name), source.db_name)
        self.log.info("task=%s copied the indexes and load state of existing collection %s", self.tid,
                      source.qualified_name)

    @staticmethod
    def _target_schema(source: SourceCollection):
        from pymilvus.grpc_gen import schema_pb2
        schema = schema_pb2.CollectionSchema()
        schema.CopyFrom(source.schema)
        del schema.fields[:]
        schema.fields.extend(f for f in source.schema.fields if not f.is_dynamic)
        return schema

    def _ensure_partition(self, source: SourceCollection, target: TargetCollection, name: str) -> int:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        if name in target.partitions:
            return target.partitions[name]
        created = {p.name: p for p in self.meta.partitions(source.id)}.get(name)
        self.writer.call(f"create partition {source.qualified_name}/{name}", "CreatePartition",
                         milvus_pb2.CreatePartitionRequest(
                             base=self.writer.base(common_pb2.CreatePartition,
                                                   created.created_ts if created else hybrid_now()),
                             db_name=source.db_name, collection_name=source.name, partition_name=name),
                         source.db_name, ok_if=lambda s: answer_says(s, *ALREADY_EXISTS))
        refreshed = self.writer.describe_collection(source.db_name, source.name)
        if refreshed is None or name not in refreshed.partitions:
            raise TargetError(f"partition {name} of {source.qualified_name} is missing on the target after its "
                              f"creation")
        target.partitions = refreshed.partitions
        return target.partitions[name]

    # -- messages ---------------------------------------------------------------------------------------------

    def _apply_message(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import common_pb2
        channel = self.channels.get(message.channel)
        if channel is None:
            return  # read before its channel was dropped from the task
        handler = self._apply_operation if channel.is_replicate else {
            common_pb2.Insert: self._apply_insert, common_pb2.Delete: self._apply_delete,
            common_pb2.CreateCollection: self._apply_create_collection,
            common_pb2.DropCollection: self._apply_drop_collection,
            common_pb2.DropPartition: self._apply_drop_partition,
        }.get(message.msg_type)
        if handler is not None:
            handler(message)

    def _addressed(self, collection_id: int, refresh: bool = False) \
            -> tuple[SourceCollection, TargetCollection] | None:
        """The replicated source collection and its target copy (created when missing), or None."""
        source = self._source(collection_id, refresh)
        if source is None:
            return None
        if source.dropped and source.id not in self.targets:
            # Dropped since (etcd is ahead of the stream): only a copy that already exists still needs what
            # comes before the drop, the drop included.
            target = self.writer.describe_collection(source.db_name, source.name)
            if target is None or target.created_ts != source.create_time:
                return None
            self.targets[source.id] = target
            self._follow(source)
        return source, self._ensure_target(source)

    def _apply_insert(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import msg_pb2
        msg = msg_pb2.InsertRequest.FromString(message.payload)
        addressed = self._addressed(msg.collectionID)
        if addressed is None:
            return
        source, target = addressed
        partition_id = self._ensure_partition(source, target, msg.partition_name)
        shard = shard_index(msg.shardName)
        self.outbox[target.pchannels[shard]].append(MessageRewriter.insert(msg, target, partition_id, shard))

    def _apply_delete(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import msg_pb2
        msg = msg_pb2.DeleteRequest.FromString(message.payload)
        addressed = self._addressed(msg.collectionID)
        if addressed is None:
            return
        source, target = addressed
        partition_id = -1
        if msg.partitionID not in (0, -1) and msg.partition_name:
            partition_id = self._ensure_partition(source, target, msg.partition_name)
        shard = shard_index(msg.shardName)
        self.outbox[target.pchannels[shard]].append(MessageRewriter.delete(msg, target, partition_id, shard))

    def _apply_create_collection(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import msg_pb2
        msg = msg_pb2.CreateCollectionRequest.FromString(message.payload)
        self._addressed(msg.collectionID, refresh=msg.collectionID not in self.targets)

    def _shards_on(self, source: SourceCollection, pchannel: str) -> list[int]:
        return [shard_index(v) for v in source.vchannels if pchannel_of(v) == pchannel]

    def _apply_drop_collection(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2, msg_pb2
        msg = msg_pb2.DropCollectionRequest.FromString(message.payload)
        source = self._source(msg.collectionID)
        target = self.targets.get(msg.collectionID)
        if source is None:
            return
        if target is None:
            target = self.writer.describe_collection(source.db_name, source.name)
            if target is None or target.created_ts != source.create_time:
                self._forget(source)
                return
        arrived = self.drops[("collection", source.id)]
        arrived[message.channel] = message.payload
        if not set(source.pchannels) <= set(arrived):
            return  # every shard must deliver the drop first, so none of its data comes after
        del self.drops[("collection", source.id)]
        for pchannel, payload in arrived.items():
            for shard in self._shards_on(source, pchannel):
                self.outbox[target.pchannels[shard]].append(MessageRewriter.drop_collection(
                    msg_pb2.DropCollectionRequest.FromString(payload), target))
        self._flush_outbox()
        self.writer.call(f"drop collection {source.qualified_name}", "DropCollection",
                         milvus_pb2.DropCollectionRequest(
                             base=self.writer.base(common_pb2.DropCollection, message.timestamp),
                             db_name=source.db_name, collection_name=source.name),
                         source.db_name, ok_if=lambda s: answer_says(s, *NOT_FOUND) or s.code == 100)
        self.log.info("task=%s dropped collection %s on the target", self.tid, source.qualified_name)
        self._forget(source)

    def _forget(self, source: SourceCollection) -> None:
        self.targets.pop(source.id, None)
        source.state = COLLECTION_DROPPED
        live = {p for c in self.sources.values() if c is not None and not c.dropped for p in c.pchannels}
        for pchannel in source.pchannels:
            if pchannel not in live:
                self._remove_channel(pchannel)

    def _apply_drop_partition(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2, msg_pb2
        msg = msg_pb2.DropPartitionRequest.FromString(message.payload)
        addressed = self._addressed(msg.collectionID)
        if addressed is None:
            return
        source, target = addressed
        arrived = self.drops[("partition", source.id, msg.partitionID)]
        arrived[message.channel] = message.payload
        if not set(source.pchannels) <= set(arrived):
            return
        del self.drops[("partition", source.id, msg.partitionID)]
        partition_id = target.partitions.get(msg.partition_name)
        if partition_id is not None:
            for pchannel, payload in arrived.items():
                for shard in self._shards_on(source, pchannel):
                    self.outbox[target.pchannels[shard]].append(MessageRewriter.drop_partition(
                        msg_pb2.DropPartitionRequest.FromString(payload), target, partition_id))
            self._flush_outbox()
        self.writer.call(f"drop partition {source.qualified_name}/{msg.partition_name}", "DropPartition",
                         milvus_pb2.DropPartitionRequest(
                             base=self.writer.base(common_pb2.DropPartition, message.timestamp),
                             db_name=source.db_name, collection_name=source.name,
                             partition_name=msg.partition_name),
                         source.db_name, ok_if=lambda s: answer_says(s, *NOT_FOUND))
        target.partitions.pop(msg.partition_name, None)
        self.log.info("task=%s dropped partition %s/%s on the target", self.tid, source.qualified_name,
                      msg.partition_name)

    def _flush_outbox(self) -> None:
        for pchannel in list(self.outbox):
            messages = self.outbox.pop(pchannel)
            self.writer.replicate(pchannel, messages)
            self.log.debug("task=%s sent %d message(s) to %s", self.tid, len(messages), pchannel)

    # -- operations of the replicate channel ------------------------------------------------------------------

    def _apply_operation(self, message: SourceMessage) -> None:
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        kinds = {
            common_pb2.CreateDatabase: ("CreateDatabase", milvus_pb2.CreateDatabaseRequest),
            common_pb2.DropDatabase: ("DropDatabase", milvus_pb2.DropDatabaseRequest),
            common_pb2.CreateIndex: ("CreateIndex", milvus_pb2.CreateIndexRequest),
            common_pb2.DropIndex: ("DropIndex", milvus_pb2.DropIndexRequest),
            common_pb2.LoadCollection: ("LoadCollection", milvus_pb2.LoadCollectionRequest),
            common_pb2.ReleaseCollection: ("ReleaseCollection", milvus_pb2.ReleaseCollectionRequest),
            common_pb2.LoadPartitions: ("LoadPartitions", milvus_pb2.LoadPartitionsRequest),
            common_pb2.ReleasePartitions: ("ReleasePartitions", milvus_pb2.ReleasePartitionsRequest),
            common_pb2.Flush: ("Flush", milvus_pb2.FlushRequest),
        }
        if message.msg_type not in kinds:
            self.log.debug("task=%s skipped replicate-channel message type %d", self.tid, message.msg_type)
            return
        method, cls = kinds[message.msg_type]
        request = cls.FromString(message.payload)
        db_name = request.db_name or DEFAULT_DB
        request.base.CopyFrom(self.writer.base(message.msg_type, message.timestamp))
        if method in ("CreateDatabase", "DropDatabase"):
            if self.filter.everything:
                exists = ALREADY_EXISTS if method == "CreateDatabase" else NOT_FOUND
                self.writer.call(f"{method} {request.db_name}", method, request,
                                 ok_if=lambda s: answer_says(s, *exists))
            return
        if method == "Flush":
            names = []
            for name in request.collection_names:
                source = self._source_by_name(db_name, name, message.timestamp)
                if source is not None and self.targets.get(source.id) is not None:
                    names.append(name)
            if names:
                del request.collection_names[:]
                request.collection_names.extend(names)
                self._flush_outbox()
                self.writer.call(f"flush {db_name}.{','.join(names)}", method, request, db_name,
                                 ok_if=lambda s: answer_says(s, *NOT_FOUND))
            return
        source = self._source_by_name(db_name, request.collection_name, message.timestamp)
        if source is None or source.dropped and source.id not in self.targets:
            return
        self._ensure_target(source)
        ok = {"CreateIndex": ALREADY_EXISTS, "DropIndex": NOT_FOUND + ("index not exist",),
              "ReleaseCollection": NOT_FOUND, "ReleasePartitions": NOT_FOUND}.get(method, ())
        self._flush_outbox()
        self.writer.call(f"{method} {source.qualified_name}", method, request, db_name,
                         ok_if=lambda s: bool(ok) and answer_says(s, *ok))
        self.log.info("task=%s applied %s on %s", self.tid, method, source.qualified_name)

    def _sync_partition_load(self, collection_id: int) -> None:
        """Load and release partitions leave no message in the MQ of Milvus 2.3: follow the source's load state
        in etcd for collections loaded partition by partition."""
        from pymilvus.grpc_gen import common_pb2, milvus_pb2
        source = self._source(collection_id)
        if source is None or source.dropped:
            return
        state = self.meta.load_state(collection_id)
        if state is not None:
            self.load_types[collection_id] = state[0]
        if self.load_types.get(collection_id) != LOAD_TYPE_PARTITION:
            return  # loaded or released as a whole: the replicate channel's Load/ReleaseCollection carries it
        if state is None:
            del self.load_types[collection_id]
        target = self._ensure_target(source)
        names = {p.id: p.name for p in self.meta.partitions(collection_id)}
        wanted = {names[p] for p in (state[1] if state else set()) if p in names}
        loaded = self.writer.loaded_partitions(source.db_name, source.name)
        ts = hybrid_now()
        if wanted - loaded:
            for name in wanted - loaded:
                self._ensure_partition(source, target, name)
            self.writer.call(f"load partitions of {source.qualified_name}", "LoadPartitions",
                             milvus_pb2.LoadPartitionsRequest(
                                 base=self.writer.base(common_pb2.LoadPartitions, ts), db_name=source.db_name,
                                 collection_name=source.name, partition_names=sorted(wanted)), source.db_name)
            self.log.info("task=%s loaded partitions %s of %s", self.tid, sorted(wanted), source.qualified_name)
        if loaded - wanted:
            self.writer.call(f"release partitions of {source.qualified_name}", "ReleasePartitions",
                             milvus_pb2.ReleasePartitionsRequest(
                                 base=self.writer.base(common_pb2.ReleasePartitions, ts), db_name=source.db_name,
                                 collection_name=source.name, partition_names=sorted(loaded - wanted)),
                             source.db_name, ok_if=lambda s: answer_says(s, *NOT_FOUND))
            self.log.info("task=%s released partitions %s of %s", self.tid, sorted(loaded - wanted),
                          source.qualified_name)


###############################################################################
# Task manager: lifecycle and checked requests ################################
###############################################################################

class ApiError(Exception):
    """A request the server refuses; ``code`` is the HTTP status and the body's code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DIAL_KEYS = ("server_name", "server_pem_path", "ca_pem_path", "client_pem_path", "client_key_path")


def parse_create_request(data: Any, max_name_length: int) -> TaskInfo:
    """Check a create request's ``request_data`` and build the task; every refusal says what to fix."""
    if not isinstance(data, dict):
        raise ApiError(400, "request_data must be an object with milvus_connect_param and collection_infos")
    unknown = set(data) - {"milvus_connect_param", "collection_infos", "replay_existing"}
    if unknown:
        raise ApiError(400, f"unknown field request_data.{sorted(unknown)[0]}; expected milvus_connect_param, "
                            f"collection_infos and optionally replay_existing")
    connect = parse_connect_param(data.get("milvus_connect_param"))
    infos = data.get("collection_infos")
    if not isinstance(infos, list) or not infos:
        raise ApiError(400, 'collection_infos must be a non-empty list like [{"name": "*"}]')
    names = []
    for index, info in enumerate(infos):
        if not isinstance(info, dict) or set(info) != {"name"} or not isinstance(info["name"], str):
            raise ApiError(400, f'collection_infos[{index}] must be an object with only a string "name"')
        name = info["name"]
        if len(name) > max_name_length:
            raise ApiError(400, f"collection_infos[{index}].name is longer than maxNameLength "
                                f"({max_name_length} characters)")
        if name != "*" and not all(NAME_PATTERN.fullmatch(part) for part in name.split(".", 1)):
            raise ApiError(400, f"collection_infos[{index}].name {name!r} is not a collection name: use *, "
                                f"a name (letters, digits, _) or database.name")
        names.append(name)
    if "*" in names and len(names) > 1:
        raise ApiError(400, 'collection_infos: "*" stands for every collection and must be alone')
    if len(set(names)) != len(names):
        raise ApiError(400, "collection_infos names a collection twice")
    replay = data.get("replay_existing", False)
    if not isinstance(replay, bool):
        raise ApiError(400, "replay_existing must be true or false")
    return TaskInfo(task_id=uuid.uuid4().hex, connect=connect, collection_infos=[{"name": n} for n in names],
                    replay_existing=replay)


def parse_connect_param(param: Any) -> ConnectParam:
    if not isinstance(param, dict):
        raise ApiError(400, 'milvus_connect_param must be an object like {"uri": "http://host:19530", '
                            '"token": "user:password", "connect_timeout": 10}')
    unknown = set(param) - {"uri", "token", "connect_timeout", "dial_config"}
    if unknown:
        raise ApiError(400, f"unknown field milvus_connect_param.{sorted(unknown)[0]}; expected uri, token, "
                            f"connect_timeout, dial_config")
    uri = param.get("uri")
    if not isinstance(uri, str) or not uri:
        raise ApiError(400, "milvus_connect_param.uri is required, like http://localhost:19530")
    try:
        parsed = urllib.parse.urlsplit(uri)
        port = parsed.port
    except ValueError:
        raise ApiError(400, f"milvus_connect_param.uri {uri!r} has an invalid port") from None
    if parsed.scheme not in ("http", "https", "tcp") or not parsed.hostname:
        raise ApiError(400, f"milvus_connect_param.uri {uri!r} must be http://, https:// or tcp:// and a host, "
                            f"like http://localhost:19530")
    if port == 0:
        raise ApiError(400, f"milvus_connect_param.uri {uri!r} has an invalid port")
    token = param.get("token", "")
    if not isinstance(token, str):
        raise ApiError(400, "milvus_connect_param.token must be a string like user:password")
    timeout = param.get("connect_timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600 \
            or timeout != timeout:
        raise ApiError(400, "milvus_connect_param.connect_timeout must be a number of seconds from 0 to 3600")
    dial = param.get("dial_config") or {}
    if not isinstance(dial, dict):
        raise ApiError(400, "milvus_connect_param.dial_config must be an object")
    for key, value in dial.items():
        if key not in DIAL_KEYS:
            raise ApiError(400, f"unknown field milvus_connect_param.dial_config.{key}; expected "
                                f"{', '.join(DIAL_KEYS)}")
        if not isinstance(value, str):
            raise ApiError(400, f"milvus_connect_param.dial_config.{key} must be a string")
        if key.endswith("_path") and not os.path.isfile(value):
            raise ApiError(400, f"milvus_connect_param.dial_config.{key}: no such file on the CDC server: {value}")
    two_way = {"client_pem_path", "client_key_path"}
    if two_way & set(dial) and not two_way <= set(dial):
        raise ApiError(400, "milvus_connect_param.dial_config needs both client_pem_path and client_key_path "
                            "for two-way TLS")
    return ConnectParam(uri=uri, token=token, connect_timeout=float(timeout),
                        dial_config=tuple(sorted(dial.items())))


class TaskManager:
    """Owns the tasks: their stored state, their running replicators, and the tick clock of each target."""

    PAUSED_BY_USER = "manually pause through http interface"

    def __init__(self, config: ServerConfig, store: MetaStore):
        self.config, self.store = config, store
        self.lock = threading.RLock()
        self.tasks: dict[str, TaskInfo] = {}
        self.replicators: dict[str, Replicator] = {}
        self.clocks: dict[str, TargetClock] = {}

    def restore(self) -> None:
        """Bring back every stored task in its stored state: Running ones start again, Paused ones wait."""
        for task_id, data in sorted(self.store.load_tasks().items()):
            try:
                task = TaskInfo.from_store(data)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("task=%s cannot be restored, its stored info is damaged: %r", task_id, exc)
                continue
            with self.lock:
                self.tasks[task_id] = task
                if task.state in (TaskState.RUNNING, TaskState.INITIAL):
                    self._start(task)
            log.info("task=%s restored as %s", task_id, task.state)

    def _get(self, task_id: Any) -> TaskInfo:
        if not isinstance(task_id, str) or not task_id:
            raise ApiError(400, "request_data.task_id is required (a task id from create or list)")
        task = self.tasks.get(task_id)
        if task is None:
            raise ApiError(404, f"not found the task, task_id: {task_id}")
        return task

    def _start(self, task: TaskInfo) -> Replicator:
        clock = self.clocks.setdefault(task.connect.address, TargetClock())
        replicator = Replicator(task, self.config, self.store, clock, self._on_failure)
        self.replicators[task.task_id] = replicator
        if task.state != TaskState.RUNNING or task.reason:
            task.state, task.reason = TaskState.RUNNING, ""
            self.store.save_task(task.task_id, task.to_store())
        replicator.start()
        return replicator

    def _stop(self, task_id: str) -> None:
        replicator = self.replicators.pop(task_id, None)
        if replicator is not None:
            replicator.stop()

    def _on_failure(self, replicator: Replicator, reason: str) -> None:
        task_id = replicator.task.task_id
        with self.lock:
            if self.replicators.get(task_id) is not replicator:
                return  # paused, resumed or deleted meanwhile
            del self.replicators[task_id]  # its threads end by themselves
            task = self.tasks[task_id]
            task.state, task.reason = TaskState.PAUSED, reason
            self.store.save_task(task_id, task.to_store())

    def create(self, data: Any) -> str:
        task = parse_create_request(data, self.config.max_name_length)
        self._check_room(task)
        problem = probe_target(task.connect)
        if problem:
            raise ApiError(400, problem)
        with self.lock:
            self._check_room(task)
            self.store.save_task(task.task_id, task.to_store())
            self.tasks[task.task_id] = task
            replicator = self._start(task)
        # Answer once the start positions are pinned: everything done on the source from now on is replicated.
        deadline = time.monotonic() + 60
        while not replicator.started.wait(0.1) and not replicator.stop_event.is_set() \
                and time.monotonic() < deadline:
            pass
        log.info("task=%s created for target %s, collections %s", task.task_id, task.connect.uri,
                 [c["name"] for c in task.collection_infos])
        return task.task_id

    def _check_room(self, task: TaskInfo) -> None:
        with self.lock:
            if len(self.tasks) >= self.config.max_task_num:
                raise ApiError(400, f"the server already has maxTaskNum ({self.config.max_task_num}) tasks; "
                                    f"delete one first")
            for other in self.tasks.values():
                if other.connect.address == task.connect.address and other.filter.overlaps(task.filter):
                    raise ApiError(400, f"task {other.task_id} already replicates some of these collections to "
                                        f"{task.connect.uri}; delete it or name other collections")

    def delete(self, task_id: Any) -> None:
        with self.lock:
            task = self._get(task_id)
            self._stop(task.task_id)
            self.store.delete_task(task.task_id)
            del self.tasks[task.task_id]
        log.info("task=%s deleted", task_id)

    def pause(self, task_id: Any) -> None:
        with self.lock:
            task = self._get(task_id)
            if task.state == TaskState.PAUSED:
                raise ApiError(400, f"task {task_id} is already paused")
            self._stop(task.task_id)
            task.state, task.reason = TaskState.PAUSED, self.PAUSED_BY_USER
            self.store.save_task(task.task_id, task.to_store())
        log.info("task=%s paused", task_id)

    def resume(self, task_id: Any) -> None:
        with self.lock:
            task = self._get(task_id)
            if task.state == TaskState.RUNNING:
                raise ApiError(400, f"task {task_id} is already running")
            self._start(task)
        log.info("task=%s resumed", task_id)

    def get(self, task_id: Any) -> dict:
        with self.lock:
            task = self._get(task_id)
            shown = task.public()
            replicator = self.replicators.get(task.task_id)
        shown["channels"] = replicator.lag() if replicator else self._stored_lag(task.task_id)
        return shown

    def _stored_lag(self, task_id: str) -> list[dict]:
        now = time.time()
        return [channel_lag(c.channel, c.timestamp, now) for c in sorted(self.store.load_checkpoints(task_id).values())]

    def list(self) -> list[dict]:
        with self.lock:
            return [t.public() for t in sorted(self.tasks.values(), key=lambda t: t.created_at)]

    def positions(self, task_id: Any) -> list[dict]:
        with self.lock:
            task = self._get(task_id)
        return [c.to_json() for c in sorted(self.store.load_checkpoints(task.task_id).values())]

    def shutdown(self) -> None:
        with self.lock:
            replicators = list(self.replicators.values())
            self.replicators.clear()
        for replicator in replicators:
            replicator.stop_event.set()
        for replicator in replicators:
            replicator.stop()


###############################################################################
# HTTP API #####################################################################
###############################################################################

class CdcApi:
    """``POST /cdc`` with ``{"request_type": ..., "request_data": {...}}``; answers ``{"code", "message",
    "data"}`` with the HTTP status equal to ``code``."""

    MAX_BODY = 1 << 20
    REQUEST_TYPES = ("create", "delete", "pause", "resume", "get", "list", "position")

    def __init__(self, manager: TaskManager):
        import bottle
        self.bottle, self.manager = bottle, manager
        self.app = bottle.Bottle()
        self.app.route("/cdc", method="POST", callback=self.handle)
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

    def reply(self, code: int, message: str = "", data: Any = None):
        body = {"code": code, "message": message}
        if data is not None:
            body["data"] = data
        return self.bottle.HTTPResponse(json.dumps(body), status=code, headers={"Content-Type": "application/json"})

    def handle(self):
        try:
            return self.reply(200, "", self.dispatch(self._body()))
        except ApiError as exc:
            if exc.code >= 500:
                log.error("api: %s", exc.message)
            return self.reply(exc.code, exc.message)
        except Exception:  # noqa: BLE001 - the client gets a short message, the log gets the trace
            log.exception("api: internal error")
            return self.reply(500, "internal error, see the server log")

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
            return {"tasks": self.manager.list()}
        if not isinstance(data, dict) or set(data) != {"task_id"}:
            raise ApiError(400, f'{kind} needs request_data {{"task_id": "..."}} and nothing else')
        task_id = data["task_id"]
        if kind == "get":
            return {"Task": self.manager.get(task_id)}
        if kind == "position":
            return {"task_id": task_id, "positions": self.manager.positions(task_id)}
        getattr(self.manager, kind)(task_id)
        return {}


###############################################################################
# Main #########################################################################
###############################################################################

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Milvus CDC server")
    parser.add_argument("-c", "--config", default="config.yaml", help="path of the YAML config (config.yaml)")
    args = parser.parse_args(argv)
    try:
        config, warnings = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("kafka", "pulsar", "waitress.queue"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    for warning in warnings:
        log.warning(warning)
    try:
        store = open_meta_store(config.meta_store)
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a trace
        print(f"meta store ({config.meta_store.store_type}) is not reachable: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    manager = TaskManager(config, store)
    import waitress
    try:
        server = waitress.create_server(CdcApi(manager).app, host=config.host, port=config.port, threads=8)
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
