"""Model-based fuzzing of replication: random sequences of every replicated operation on the source, fired
back to back, then the whole visible state of source and target compared.

A hypothesis ``RuleBasedStateMachine`` keeps a model of what the source accepted (databases, collections with
their schema, partitions, the vector index, load states, which key lives in which partition) and picks mostly
valid operations from it. After the last step the test waits for the target to converge and compares
databases, collections, schemas, shards, partitions, indexes and load states; then it indexes and loads every
collection *on the source* (the CDC replicates that too) and compares every row, partition by partition, and
``count(*)``. A failing sequence is shrunk by hypothesis; the report is the shortest failing sequence of
operations, as run on the source, and the diff.

Each sequence runs under a task of one of three scopes, in turn: ``star`` (every database and collection, same
names on the target), ``scoped`` (``db_collections``: one database of the sequence, maybe not yet created; nothing
else of the sequence may reach the target) or ``mapped`` (``*`` with a ``name_mapping`` renaming one database of
the sequence and some collections); the target is compared with the source's state as the task's scope and names
make it.

Between the source operations the task's lifecycle is disrupted, never waiting for the target: ``pause_resume``
(POST /cdc pause, then resume), ``kill_restart`` (kill -9 the CDC server, start it again on the same config: it
resumes the task, same id, from the checkpoints in its meta store) and ``stop_restart`` (SIGTERM, start). They are
rules like the others, but cost a second or two each: a drawn one acts with probability ``--lifecycle`` (default
0.4), and ``--lifecycle-every N`` forces one after N steps in a row without one (and at the end of a sequence that
had none). They show in a failing sequence as ``[cdc]`` lines. ``--keep-going`` records a failing sequence and goes
on with the next instead of shrinking the first, so that a long run counts its failures; ``--own-target``
replicates into a target Milvus started for the run, for a stack that other tests use at the same time.

    python tests/fuzz_replication.py --sequences 20 [--steps 25] [--seed 7] [--mode star|scoped|mapped|mixed]
        [--lifecycle 0.4] [--lifecycle-every N] [--keep-going] [--own-target]

starts its own stack (tests/stack.py) unless CDC_TEST_STACK names a running stack's JSON, and its own CDC
server. ``tests/test_fuzz_replication.py`` runs the same under pytest.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import random
import re
import string
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, Verbosity, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import Flaky, UnsatisfiedAssumption
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (ROOT, CdcServer, hybrid_now, indexes_of, load_state_of, schema_of,  # noqa: E402
                     server_config, wait_until)

DEFAULT_DB = "default"
PICK = st.integers(0, 1 << 16)        # an index into a sorted list of candidates: shrinks to the first one
SEED = st.integers(0, (1 << 32) - 1)   # rows and subsets come from random.Random(seed): reproducible per step
DB_SLOTS, COLLECTION_SLOTS, PARTITION_SLOTS = 2, 3, 3   # few names, so drop-and-recreate of a name is likely
QUERY_LIMIT = 16384


# ---------------------------------------------------------------------------------------------------------
# Random schemas and index parameters
# ---------------------------------------------------------------------------------------------------------

SCALAR_TYPES = ("BOOL", "INT8", "INT16", "INT32", "INT64", "FLOAT", "DOUBLE", "VARCHAR", "JSON")
CONSISTENCY = ("Bounded", "Strong", "Session", "Eventually")


@dataclass(frozen=True)
class FieldSpec:
    name: str
    dtype: str                      # a pymilvus DataType name
    max_length: int | None = None   # VARCHAR
    dim: int | None = None          # vectors

    def __str__(self) -> str:
        size = f"({self.max_length})" if self.max_length else f"({self.dim})" if self.dim else ""
        return f"{self.name} {self.dtype}{size}"


@dataclass(frozen=True)
class SchemaSpec:
    pk: FieldSpec
    auto_id: bool
    scalars: tuple[FieldSpec, ...]
    vector: FieldSpec
    dynamic: bool
    shards: int
    partition_key: str | None        # name of one of the scalars
    num_partitions: int | None       # with a partition key only
    consistency: str
    description: str

    @property
    def binary(self) -> bool:
        return self.vector.dtype == "BINARY_VECTOR"

    def field(self, name: str) -> FieldSpec:
        return next(f for f in self.scalars if f.name == name)

    def to_milvus(self):
        from pymilvus import DataType, MilvusClient
        schema = MilvusClient.create_schema(auto_id=self.auto_id, enable_dynamic_field=self.dynamic,
                                            description=self.description)
        for spec in (self.pk, *self.scalars, self.vector):
            kwargs: dict[str, Any] = {}
            if spec.max_length:
                kwargs["max_length"] = spec.max_length
            if spec.dim:
                kwargs["dim"] = spec.dim
            if spec is self.pk:
                kwargs["is_primary"] = True
            if spec.name == self.partition_key:
                kwargs["is_partition_key"] = True
            schema.add_field(spec.name, getattr(DataType, spec.dtype), **kwargs)
        return schema

    def __str__(self) -> str:
        parts = [f"pk {self.pk}" + (" auto_id" if self.auto_id else ""), *map(str, self.scalars), str(self.vector)]
        extra = [f"{self.shards} shard(s)", f"consistency {self.consistency}"]
        if self.dynamic:
            extra.append("dynamic")
        if self.partition_key:
            extra.append(f"partition key {self.partition_key} x{self.num_partitions}")
        if self.description:
            extra.append(f"description {self.description!r}")
        return f"[{', '.join(parts)}; {', '.join(extra)}]"


@st.composite
def schema_specs(draw) -> SchemaSpec:
    varchar_pk = draw(st.booleans())
    # An auto_id VARCHAR key is an int64 printed as a string: up to 20 characters.
    pk = FieldSpec("pk", "VARCHAR", max_length=draw(st.sampled_from([24, 64]))) if varchar_pk else \
        FieldSpec("pk", "INT64")
    kinds = draw(st.lists(st.sampled_from(SCALAR_TYPES), max_size=5))
    scalars = tuple(FieldSpec(f"{kind.lower()}_{i}", kind,
                              max_length=draw(st.sampled_from([16, 64])) if kind == "VARCHAR" else None)
                    for i, kind in enumerate(kinds))
    if draw(st.booleans()):
        vector = FieldSpec("vec", "BINARY_VECTOR", dim=draw(st.sampled_from([8, 16, 32])))
    else:
        vector = FieldSpec("vec", "FLOAT_VECTOR", dim=draw(st.sampled_from([2, 4, 8])))
    key_candidates = [f.name for f in scalars if f.dtype in ("INT64", "VARCHAR")]
    partition_key = draw(st.sampled_from([None, *key_candidates])) if key_candidates else None
    return SchemaSpec(pk=pk, auto_id=draw(st.booleans()), scalars=scalars, vector=vector,
                      dynamic=draw(st.booleans()), shards=draw(st.integers(1, 2)), partition_key=partition_key,
                      num_partitions=draw(st.integers(1, 4)) if partition_key else None,
                      consistency=draw(st.sampled_from(CONSISTENCY)),
                      description=draw(st.sampled_from(["", "fuzzed collection"])))


@dataclass(frozen=True)
class IndexSpec:
    index_type: str
    metric: str
    params: tuple[tuple[str, int], ...]
    name: str | None

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.index_type}({params}) {self.metric}" + (f" name={self.name}" if self.name else "")


@dataclass(frozen=True)
class IndexChoice:
    """An index drawn without knowing the vector type; ``resolve`` makes it fit the collection."""
    kind: int
    metric: int
    nlist: int
    m: int
    ef: int
    named: bool

    def resolve(self, binary: bool) -> IndexSpec:
        name = "vec_idx" if self.named else None
        if binary:
            kind = ("BIN_FLAT", "BIN_IVF_FLAT")[self.kind % 2]
            metric = ("HAMMING", "JACCARD")[self.metric % 2]
            params = (("nlist", self.nlist),) if kind == "BIN_IVF_FLAT" else ()
            return IndexSpec(kind, metric, params, name)
        kind = ("FLAT", "IVF_FLAT", "HNSW")[self.kind % 3]
        metric = ("L2", "IP", "COSINE")[self.metric % 3]
        params = {"FLAT": (), "IVF_FLAT": (("nlist", self.nlist),),
                  "HNSW": (("M", self.m), ("efConstruction", self.ef))}[kind]
        return IndexSpec(kind, metric, params, name)


INDEX_CHOICES = st.builds(IndexChoice, kind=st.integers(0, 5), metric=st.integers(0, 5),
                          nlist=st.sampled_from([1, 8, 64]), m=st.sampled_from([4, 16, 48]),
                          ef=st.sampled_from([8, 64, 200]), named=st.booleans())


def default_index(binary: bool) -> IndexSpec:
    return IndexSpec("BIN_FLAT", "HAMMING", (), None) if binary else IndexSpec("FLAT", "L2", (), None)


# ---------------------------------------------------------------------------------------------------------
# Random rows
# ---------------------------------------------------------------------------------------------------------

TEXT = string.ascii_letters + string.digits + " _-"


def random_value(spec: FieldSpec, rng: random.Random) -> Any:
    kind = spec.dtype
    if kind == "BOOL":
        return rng.random() < 0.5
    if kind in ("INT8", "INT16", "INT32", "INT64"):
        bits = {"INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64}[kind]
        return rng.randint(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    if kind == "FLOAT":  # no NaN/inf: they never compare equal
        return rng.uniform(-1e4, 1e4)
    if kind == "DOUBLE":
        return rng.uniform(-1e12, 1e12)
    if kind == "VARCHAR":
        return "".join(rng.choice(TEXT) for _ in range(rng.randint(0, spec.max_length)))
    if kind == "JSON":
        doc = {"n": rng.randint(-1000, 1000), "s": "".join(rng.choice(TEXT) for _ in range(rng.randint(0, 8)))}
        if rng.random() < 0.5:
            doc["nested"] = {"flag": rng.random() < 0.5, "list": [rng.randint(0, 9) for _ in range(3)]}
        return doc
    if kind == "FLOAT_VECTOR":
        return [rng.uniform(-1, 1) for _ in range(spec.dim)]
    if kind == "BINARY_VECTOR":
        return bytes(rng.randrange(256) for _ in range(spec.dim // 8))
    raise ValueError(kind)


def partition_key_value(spec: SchemaSpec, key: Any, rng: random.Random) -> Any:
    """A row's partition-key value follows from its primary key, so an upsert keeps the row in its partition
    (Milvus 2.3 upserts delete only in the partition they write to: a moved key would be duplicated)."""
    field_spec = spec.field(spec.partition_key)
    if key is None:
        return random_value(field_spec, rng)
    digest = sum(str(key).encode()) * 31 + len(str(key))
    return digest % 1000 if field_spec.dtype == "INT64" else f"pk{digest % 1000}"


def make_row(spec: SchemaSpec, key: Any, rng: random.Random) -> dict:
    row = {} if key is None else {spec.pk.name: key}
    for f in spec.scalars:
        row[f.name] = partition_key_value(spec, key, rng) if f.name == spec.partition_key else random_value(f, rng)
    row[spec.vector.name] = random_value(spec.vector, rng)
    if spec.dynamic:
        for extra in rng.sample(["dyn_int", "dyn_text", "dyn_doc"], rng.randint(0, 2)):
            row[extra] = {"dyn_int": rng.randint(0, 99), "dyn_text": "x" * rng.randint(0, 5),
                          "dyn_doc": {"k": rng.randint(0, 9)}}[extra]
    return row


def delete_expression(spec: SchemaSpec, rng: random.Random) -> str:
    """A non-primary-key filter (Milvus 2.3 runs it as a query first: the collection must be loaded)."""
    candidates = [f for f in spec.scalars if f.dtype in ("BOOL", "INT8", "INT16", "INT32", "INT64", "DOUBLE",
                                                          "FLOAT", "VARCHAR")]
    if not candidates:
        return f'{spec.pk.name} > "k{rng.randint(0, 30)}"' if spec.pk.dtype == "VARCHAR" else \
            f"{spec.pk.name} > {rng.randint(0, 30)}"
    f = rng.choice(candidates)
    if f.dtype == "BOOL":
        return f"{f.name} == {rng.choice(['true', 'false'])}"
    if f.dtype == "VARCHAR":
        return f'{f.name} like "{rng.choice(TEXT[:52])}%"'
    if f.dtype in ("FLOAT", "DOUBLE"):
        return f"{f.name} > {rng.uniform(0, 5e3 if f.dtype == 'FLOAT' else 5e11):.1f}"
    bits = {"INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64}[f.dtype]
    return f"{f.name} > {rng.randint(0, (1 << (bits - 1)) - 1)}"


# ---------------------------------------------------------------------------------------------------------
# The model of the source
# ---------------------------------------------------------------------------------------------------------

@dataclass
class CollectionModel:
    db: str
    name: str
    spec: SchemaSpec
    partitions: set[str]
    index: IndexSpec | None = None
    loaded: set[str] = field(default_factory=set)         # loaded partitions, as the source reports them
    keys: dict[Any, str] = field(default_factory=dict)    # live key -> its partition ("" under a partition key)
    next_key: int = 0

    @property
    def qualified(self) -> str:
        return f"{self.db}.{self.name}"

    @property
    def partition_keyed(self) -> bool:
        return self.spec.partition_key is not None

    def user_partitions(self) -> list[str]:
        """Partitions a user may drop (a partition-key collection's are Milvus's own)."""
        return [] if self.partition_keyed else sorted(p for p in self.partitions if p != "_default")

    def fresh_keys(self, count: int) -> list[Any]:
        first, self.next_key = self.next_key, self.next_key + count
        return [f"k{i}" if self.spec.pk.dtype == "VARCHAR" else i for i in range(first, first + count)]


@dataclass
class Op:
    text: str
    refused: str | None = None
    seconds: float = 0.0
    kind: str = "source"    # an operation on the source; "note" (a line of the history), "cdc" (a lifecycle step)

    def __str__(self) -> str:
        return self.text + (f"   -> refused by the source: {self.refused}" if self.refused else "")


# ---------------------------------------------------------------------------------------------------------
# The task's scope and names
# ---------------------------------------------------------------------------------------------------------

MODES = ("star", "scoped", "mapped")
# What a mapped database or collection is called on the target: the sequence's name plus this, so the target's
# names keep the sequence's prefix (the snapshot finds them, sweep_leftovers removes them), and no source name of
# the sequence ends with it.
MAPPED = "_m"


@dataclass(frozen=True)
class TaskScope:
    """What a sequence's task replicates and under which names: ``star`` everything under its own name;
    ``scoped`` only ``database``, its create and drop included; ``mapped`` everything, ``database`` renamed, and the
    ``renamed`` collections renamed in the default database and in ``database``."""
    mode: str = "star"
    database: str = ""
    renamed: tuple[str, ...] = ()

    def request(self) -> dict:
        """The create request's scope, as CdcServer.create_task takes it."""
        if self.mode == "scoped":
            return {"collections": (), "db_collections": {self.database: [{"name": "*"}]}}
        if self.mode == "star":
            return {}
        renames = {name: name + MAPPED for name in self.renamed}
        return {"name_mapping": [
            {"source_db": DEFAULT_DB, "target_db": DEFAULT_DB, "collection_mapping": renames},
            {"source_db": self.database, "target_db": self.database + MAPPED, "collection_mapping": renames}]}

    @property
    def partial(self) -> bool:
        """Does the task leave some of the sequence out? Then the target being equal once is not enough: what is
        left out must not arrive later either. (The clean-up's waits need not check again: it only drops.)"""
        return self.mode == "scoped"

    def target(self, db: str, *name: str) -> tuple[str, ...] | None:
        """The target's names of a source database (or of a collection in it); None when the task leaves it out."""
        if self.mode == "scoped" and db != self.database:
            return None
        mapped = self.mode == "mapped"
        renamed = [n + MAPPED if mapped and db in (DEFAULT_DB, self.database) and n in self.renamed else n
                   for n in name]
        return (db + MAPPED if mapped and db == self.database else db, *renamed)

    def source(self, db: str, *name: str) -> tuple[str, ...] | None:
        """The source's names whose copy has these names on the target; None when nothing maps to them. The
        mapping only appends MAPPED, which no source name of a sequence ends with."""
        source = tuple(part.removesuffix(MAPPED) for part in (db, *name))
        return source if self.target(*source) == (db, *name) else None

    def __str__(self) -> str:
        short = OUR_NAMES.sub("", self.database)
        if self.mode == "scoped":
            return f"scoped: db_collections {{{short}: *}}, nothing else of the sequence"
        if self.mode == "mapped":
            renamed = ", ".join(f"{OUR_NAMES.sub('', n)} -> {OUR_NAMES.sub('', n)}{MAPPED}" for n in self.renamed)
            return f"mapped: * with {short} -> {short}{MAPPED}, and {renamed} in default and in {short}"
        return "star: *"


@dataclass(frozen=True)
class ScopeChoice:
    """What a scoped or mapped task is about, drawn before the sequence's names are known; ``resolve`` names it. A
    mapped scope renames the first collection slot (every sequence creates it) and the ``renamed`` others; the
    rest keep their names."""
    database: int
    renamed: frozenset[int]

    def resolve(self, prefix: str, mode: str) -> TaskScope:
        if mode == "star":
            return TaskScope()
        renamed = tuple(f"{prefix}_c{i}" for i in sorted({0, *self.renamed})) if mode == "mapped" else ()
        return TaskScope(mode, f"{prefix}_d{self.database}", renamed)


SCOPE_CHOICES = st.builds(ScopeChoice, database=st.integers(0, DB_SLOTS - 1),
                          renamed=st.frozensets(st.integers(1, COLLECTION_SLOTS - 1)))


# ---------------------------------------------------------------------------------------------------------
# Snapshots of one side and their diff
# ---------------------------------------------------------------------------------------------------------

def _guarded(fn: Callable[[], Any]) -> Any:
    """A value, or the error reading it: a half-converged target answers with errors, which also differ."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return f"<error: {str(exc)[:160]}>"


def describe_collection(milvus, name: str) -> dict:
    described = milvus.describe_collection(name)
    schema = schema_of(milvus, name)
    schema["fields"] = {f["name"]: f for f in schema["fields"]}  # by name: a diff then names the field
    schema["created_timestamp"] = described.get("created_timestamp")
    schema["num_partitions"] = described.get("num_partitions")
    partitions = sorted(milvus.list_partitions(name))
    load = {"<collection>": _guarded(lambda: load_state_of(milvus, name))}
    for p in partitions:
        load[p] = _guarded(lambda p=p: load_state_of(milvus, name, p))
    return {"schema": schema, "partitions": partitions, "indexes": _guarded(lambda: indexes_of(milvus, name)),
            "load": load}


def rows_by_partition(milvus, name: str, pk: str, partitions: list[str] | None, timeout: float) -> dict:
    """Rows per partition (so a row in the wrong partition shows), keyed by primary key; ``partitions`` None
    reads the whole collection at once (a partition-key collection refuses partition names).

    Only count(*) reads Strong (it waits for the server's ticks to reach its present); the partitions are read
    right after with Eventually, which sees at least as much, since what a query node serves only grows."""
    found: dict[str, Any] = {"count(*)": milvus.query(name, filter="", output_fields=["count(*)"],
                                                       consistency_level="Strong", timeout=timeout)[0]["count(*)"]}
    for p in partitions if partitions is not None else [None]:
        rows = milvus.query(name, filter="", output_fields=["*"], partition_names=[p] if p else None,
                            limit=QUERY_LIMIT, consistency_level="Eventually", timeout=timeout)
        found[p or "<all partitions>"] = {row.pop(pk): row for row in rows}
    return found


class Clients:
    """One MilvusClient per (side, database), made when the database exists (pymilvus refuses others)."""

    def __init__(self, uris: dict[str, str]):
        self.uris, self.cache = uris, {}

    def get(self, side: str, db: str):
        from pymilvus import MilvusClient
        if (side, db) not in self.cache:
            self.cache[(side, db)] = MilvusClient(uri=self.uris[side], db_name=db, timeout=60)
        return self.cache[(side, db)]

    def forget_schema(self, side: str, db: str, name: str | None = None) -> None:
        """pymilvus caches a collection's schema by name per connection and inserts with it: after a drop the
        next incarnation of the name would be written with the old schema."""
        if (side, db) in self.cache:
            cache = self.cache[(side, db)]._get_connection().schema_cache
            cache.pop(name, None) if name else cache.clear()


def snapshot(clients: Clients, side: str, prefix: str, with_rows: bool) -> dict:
    """Everything of this sequence that a user of one side can see."""
    default = clients.get(side, DEFAULT_DB)
    dbs = sorted(d for d in default.list_databases() if d.startswith(prefix))
    state: dict[str, Any] = {"databases": dbs}
    for db in [DEFAULT_DB, *dbs]:
        milvus = clients.get(side, db)
        for name in sorted(n for n in milvus.list_collections() if n.startswith(prefix)):
            described = _guarded(lambda m=milvus, n=name: describe_collection(m, n))
            if with_rows and isinstance(described, dict):
                fields = described["schema"]["fields"].values()
                pk = next(f["name"] for f in fields if f["is_primary"])
                partitions = None if any(f.get("is_partition_key") for f in fields) else described["partitions"]
                # A Strong read waits for the target's ticks: a stuck CDC would hold each poll for long.
                timeout = 30 if side == "source" else 10
                described["rows"] = _guarded(lambda m=milvus, n=name, k=pk, ps=partitions, t=timeout:
                                             rows_by_partition(m, n, k, ps, t))
            state[f"{db}.{name}"] = described
    return state


def line_up(state: dict, side: str, scope: TaskScope) -> dict:
    """One side's snapshot keyed so that the two sides line up: what the task replicates under "source name ->
    target name" (the name alone when both are the same); on the source, what the task leaves out is left out; on
    the target, a name nothing maps to stays, marked, and so shows as only on the target."""
    def label(*names: str) -> str | None:
        source, target = (names, scope.target(*names)) if side == "source" else (scope.source(*names), names)
        if target is None:
            return None
        if source is None:
            return f"{'.'.join(target)} (a target name that nothing in the task's scope maps to)"
        return ".".join(source) if source == target else f"{'.'.join(source)} -> {'.'.join(target)}"
    lined: dict[str, Any] = {"databases": sorted(filter(None, map(label, state["databases"])))}
    for key, value in state.items():
        if key != "databases" and (name := label(*key.split(".", 1))) is not None:
            lined[name] = value
    return lined


def diff(source: Any, target: Any, path: str = "") -> list[str]:
    """Readable differences, one line each; a partition's rows are summarised by key."""
    if source == target:
        return []
    if isinstance(source, dict) and isinstance(target, dict):
        if path.rsplit("/", 2)[-2:-1] == ["rows"] and not path.endswith("count(*)"):
            return diff_rows(source, target, path)
        lines = []
        for key in sorted(set(source) | set(target), key=str):
            where = f"{path}/{key}" if path else str(key)
            if key not in target:
                lines.append(f"{where}: only on the source" + _brief(source[key]))
            elif key not in source:
                lines.append(f"{where}: only on the target" + _brief(target[key]))
            else:
                lines += diff(source[key], target[key], where)
        return lines
    return [f"{path}: source {_short(source)} != target {_short(target)}"]


def _short(value: Any, limit: int = 400) -> str:
    if isinstance(value, dict) and "schema" in value:
        return "(a collection)"
    if isinstance(value, dict) and "count(*)" in value:
        return f"({value['count(*)']} row(s))"
    text = repr(value)
    return text[:limit] + ("..." if len(text) > limit else "")


def _brief(value: Any) -> str:
    return f" {_short(value, 200)}"


def diff_rows(source: dict, target: dict, where: str) -> list[str]:
    missing = [k for k in source if k not in target]
    extra = [k for k in target if k not in source]
    changed = [k for k in source if k in target and source[k] != target[k]]
    lines = []
    if missing:
        lines.append(f"{where}: {len(missing)} row(s) missing on the target, keys {sorted(missing, key=str)[:10]}")
    if extra:
        lines.append(f"{where}: {len(extra)} extra row(s) on the target, keys {sorted(extra, key=str)[:10]}")
    for key in sorted(changed, key=str)[:3]:
        ours, theirs = source[key], target[key]
        detail = {f: (ours.get(f), theirs.get(f)) for f in sorted(set(ours) | set(theirs))
                  if ours.get(f) != theirs.get(f)}
        lines.append(f"{where}: key {key!r} differs (source, target): {str(detail)[:300]}")
    if len(changed) > 3:
        lines.append(f"{where}: ... {len(changed) - 3} more differing row(s)")
    return lines


def errors_in(value: Any, path: str = "") -> list[str]:
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in errors_in(v, f"{path}/{k}" if path else str(k))]
    return [f"{path}: {value}"] if isinstance(value, str) and value.startswith("<error: ") else []


def source_self_check(state: dict) -> list[str]:
    """Reading the (idle) source must work, and the model avoids duplicate keys there: otherwise the test is
    wrong, not the CDC."""
    problems = [f"reading the SOURCE failed (a test bug): {e}" for e in errors_in(state)]
    for name, described in state.items():
        rows = described.get("rows") if isinstance(described, dict) else None
        if isinstance(rows, dict):
            keys = sum(len(v) for p, v in rows.items() if p != "count(*)")
            if rows.get("count(*)") != keys:
                problems.append(f"{name}: the SOURCE has count(*) {rows.get('count(*)')} but {keys} distinct "
                                f"keys (a test bug: the model should never duplicate a key)")
    return problems


# ---------------------------------------------------------------------------------------------------------
# The harness: one CDC server and task, the clients, convergence waits, failures seen
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Limits:
    converge_timeout: float = 120.0   # the most a sequence waits for the target to equal the source
    caught_up_grace: float = 15.0     # once the CDC confirmed past the sequence's end, the target has this long
    stall_timeout: float = 40.0       # no progress of the CDC's confirmed position for this long: give up
    teardown_timeout: float = 60.0
    poll_interval: float = 0.5
    stop_timeout: float = 60.0        # a CDC server given SIGTERM must have exited by then
    start_timeout: float = 60.0       # a (re)started CDC server must answer by then


# The task-lifecycle rules, in the order a forced step (Lifecycle.every) prefers them.
LIFECYCLE_RULES = ("kill_restart", "pause_resume", "stop_restart")
LIFECYCLE_TEXT = {
    "pause_resume": "pause the task, resume it at once",
    "kill_restart": "kill -9 the CDC server, start it again (same config, meta store and task)",
    "stop_restart": "stop the CDC server (SIGTERM), start it again (same config, meta store and task)"}
DEFAULT_LIFECYCLE_RATE = 0.4


@dataclass(frozen=True)
class Lifecycle:
    """How often a sequence's task is disrupted between source operations, never waiting for the target. A
    lifecycle rule that hypothesis draws acts with probability ``rate`` and else does nothing (each costs
    seconds); with ``every`` > 0, once ``every`` steps in a row passed without one, one is forced right after the
    step (the kind the sequence has had least of, in LIFECYCLE_RULES order), and a sequence that ends without any
    gets one after its last step, so that every sequence has one. ``kinds`` are the lifecycle rules not left out
    (the ones a forced step may take)."""
    rate: float = DEFAULT_LIFECYCLE_RATE
    every: int = 0
    kinds: tuple[str, ...] = LIFECYCLE_RULES


@dataclass
class Failure:
    number: int
    mode: str
    ops: list[Op]
    problem: str

    @property
    def kind(self) -> str:
        """The first line of the problem without names and numbers: failures of one kind share it."""
        line = self.problem.splitlines()[0]
        return re.sub(r"\d+", "N", re.sub(r"fz[0-9a-f]{8}_", "", line))[:200]

    def report(self) -> str:
        source = [o for o in self.ops if o.kind == "source"]
        accepted = [o for o in source if not o.refused]
        lifecycle = sum(1 for o in self.ops if o.kind == "cdc")
        lines = [(f"failing sequence ({len(accepted)} operation(s) accepted by the source, "
                  f"{len(source) - len(accepted)} refused, {lifecycle} CDC lifecycle step(s)):")]
        lines += [f"  {i:2d}. {op}" for i, op in enumerate(self.ops, 1)]
        return "\n".join(lines + ["difference:", self.problem])


class EngineServer(CdcServer):
    """A CdcServer running a chosen copy of milvus_cdc.py (env CDC_FUZZ_ENGINE), so a run can pin one revision of
    the engine while the working copy is being edited."""

    def __init__(self, config: dict, workdir: Path, script: Path):
        super().__init__(config, workdir)
        self.script = script

    def start(self, timeout: float = 30.0) -> EngineServer:
        import atexit
        import subprocess
        if self.proc is None:
            atexit.register(self.kill)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(self.script), "-c", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        wait_until(lambda: self.alive() and self.post({"request_type": "list"})[0] == 200, timeout,
                   what=f"the CDC server on {self.url} (log: {self.log_text()[-2000:]})")
        return self


OUR_NAMES = re.compile(r"^fz[0-9a-f]{8}_")


def sweep_leftovers(clients: Clients, target_uri: str, out: Callable[[str], None]) -> None:
    """Remove what failed (or killed) sequences left behind, on both sides: a Milvus holds at most 64 databases,
    loaded leftovers hold memory, and a new ``*`` task would copy the source's leftovers. Only this module's
    names (fz + 8 hex digits + _) are touched. The target refuses ordinary DDL writes, so its leftovers are
    dropped with replicate-flagged requests, as the CDC itself does; call this only while no task runs."""
    import base64

    import grpc
    from pymilvus.grpc_gen import common_pb2, milvus_pb2, milvus_pb2_grpc
    source = clients.get("source", DEFAULT_DB)
    for db in [DEFAULT_DB, *[d for d in source.list_databases() if OUR_NAMES.match(d)]]:
        milvus = clients.get("source", db)
        for name in [n for n in milvus.list_collections() if OUR_NAMES.match(n)]:
            with contextlib.suppress(Exception):
                milvus.drop_collection(name)
            clients.forget_schema("source", db, name)
        if db != DEFAULT_DB:
            with contextlib.suppress(Exception):
                source.drop_database(db)

    channel = grpc.insecure_channel(target_uri.removeprefix("http://"))
    stub = milvus_pb2_grpc.MilvusServiceStub(channel)
    token = ("authorization", base64.b64encode(b"root:Milvus").decode())

    def flagged(msg_type: int):
        return common_pb2.MsgBase(msg_type=msg_type, replicateInfo=common_pb2.ReplicateInfo(
            isReplicate=True, msgTimestamp=hybrid_now()))
    try:
        target = clients.get("target", DEFAULT_DB)
        dropped = 0
        for db in [DEFAULT_DB, *[d for d in target.list_databases() if OUR_NAMES.match(d)]]:
            for name in [n for n in clients.get("target", db).list_collections() if OUR_NAMES.match(n)]:
                stub.DropCollection(milvus_pb2.DropCollectionRequest(
                    base=flagged(common_pb2.DropCollection), db_name=db, collection_name=name),
                    metadata=(token, ("dbname", db)), timeout=30)
                dropped += 1
            if db != DEFAULT_DB:
                stub.DropDatabase(milvus_pb2.DropDatabaseRequest(base=flagged(common_pb2.DropDatabase), db_name=db),
                                  metadata=(token,), timeout=30)
                dropped += 1
        if dropped:
            out(f"    (swept {dropped} leftover database(s)/collection(s) from the target)")
    finally:
        channel.close()


def engine_script() -> Path:
    return Path(os.environ.get("CDC_FUZZ_ENGINE") or ROOT / "milvus_cdc.py").resolve()


class Harness:
    """One CDC server with one task at a time (the scope of the sequence running), the clients of both sides, the
    convergence wait, and the failures seen."""

    def __init__(self, endpoints: dict, workdir: Path, limits: Limits | None = None,
                 out: Callable[[str], None] = print, verbose: bool = False, cdc_settings: dict | None = None,
                 modes: tuple[str, ...] = MODES, lifecycle: Lifecycle | None = None, keep_going: bool = False):
        self.endpoints, self.workdir, self.limits = endpoints, workdir, limits or Limits()
        self.lifecycle = lifecycle or Lifecycle()
        self.keep_going = keep_going             # record a failing sequence and go on, without shrinking
        self.cdc_settings = cdc_settings or {}   # CDC config keys (dotted) for the run
        self.out, self.verbose = out, verbose
        self.modes = modes                       # the task scopes sequences take in turn
        self.turns = 0
        self.clients = Clients({"source": endpoints["source_milvus"], "target": endpoints["target_milvus"]})
        self.server: EngineServer | None = None
        self.task_id = ""
        self.scope: TaskScope | None = None      # the running task's
        self.fresh_task_needed = False
        self.failures: list[Failure] = []
        self.examples = 0
        self.durations: list[float] = []
        self.mode_counts: Counter[str] = Counter()   # sequences compared, per mode
        self.lifecycle_counts: Counter[str] = Counter()   # lifecycle steps done, per rule (shrink attempts too)
        self.disrupted = 0                           # sequences compared that had at least one lifecycle step
        self.source_ops = self.refused_ops = 0       # operations on the source of the sequences compared

    # -- the CDC ------------------------------------------------------------------------------------------

    def start(self) -> Harness:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A failing target write pauses the task after retryTimeout: shorter than the suite's 30 s, since every
        # failing shrink attempt waits for it.
        config = server_config(self.endpoints, self.workdir, **{
            "replication.retryTimeout": float(os.environ.get("CDC_FUZZ_RETRY_TIMEOUT", "5")), **self.cdc_settings})
        self.server = EngineServer(config, self.workdir, engine_script()).start(self.limits.start_timeout)
        return self

    def ensure_server(self) -> None:
        """A CDC server that answers: after a lifecycle step that failed to bring it back, the next sequence starts
        it again (same config: port, meta store with its tasks, log appended to)."""
        if self.server.alive() and _guarded(lambda: self.server.post({"request_type": "list"})[0]) == 200:
            return
        self.server.kill()
        self.server.start(self.limits.start_timeout)

    def pause_resume(self) -> None:
        """POST /cdc pause, then resume, of the running task, back to back."""
        self.server.call("pause", task_id=self.task_id)
        self.server.call("resume", task_id=self.task_id)

    def restart_server(self, how: str) -> None:
        """Kill -9 (``kill``) or SIGTERM (``stop``) the CDC server, then start it on the same config: same port, same
        meta store (the task and its checkpoints: it resumes from them under the same id), same log file (appended
        to, so log marks stay valid). A server that does not exit within stop_timeout of SIGTERM is killed and
        reported."""
        import signal
        import subprocess
        server = self.server
        if how == "kill":
            server.kill()
        elif server.alive():
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(self.limits.stop_timeout)
            except subprocess.TimeoutExpired:
                server.kill()
                raise AssertionError(f"the CDC server did not exit within {self.limits.stop_timeout:g}s of "
                                     f"SIGTERM (killed)") from None
        server.start(self.limits.start_timeout)

    def close(self) -> None:
        if self.server is not None:
            if self.task_id:
                with contextlib.suppress(Exception):
                    self.server.call("delete", task_id=self.task_id)
            if self.fresh_task_needed:  # the last sequence failed: leave no leftovers for whoever comes next
                with contextlib.suppress(Exception):
                    sweep_leftovers(self.clients, self.endpoints["target_milvus"], self.out)
            self.server.stop()

    def task_problem(self) -> str | None:
        task = self.server.task(self.task_id)
        if task["state"] != "Running":
            return f"the CDC task is {task['state']}: {task.get('reason')}"
        return None

    def next_mode(self) -> str:
        """The next sequence's task scope: the run's modes in turn, so that each has its share however hypothesis
        draws (its draws come in runs of similar examples); once a sequence failed, that sequence's mode, so that
        shrinking reproduces it (unless the run keeps going after failures)."""
        if self.failures and not self.keep_going:
            return self.failures[0].mode
        self.turns += 1
        return self.modes[(self.turns - 1) % len(self.modes)]

    def ensure_task(self, scope: TaskScope) -> None:
        """A running task of ``scope``: the one there is when it has that scope and is well, else a new one, the old
        one deleted first (the server refuses a second task whose scope overlaps). After a failed sequence the task
        may be paused or wedged and both sides may hold leftovers: the next sequence gets a new task and swept
        sides, so each sequence (and each shrink attempt) is judged on its own."""
        self.ensure_server()
        suspect = self.fresh_task_needed or not self.task_id or self.task_problem() is not None
        if not suspect and scope == self.scope:
            return
        if self.task_id:
            with contextlib.suppress(Exception):
                self.server.call("delete", task_id=self.task_id)
            self.task_id, self.scope = "", None
        if suspect:
            sweep_leftovers(self.clients, self.endpoints["target_milvus"], self.out)
        self.task_id = self.server.create_task(self.endpoints["target_milvus"], **scope.request())
        self.scope = scope
        self.fresh_task_needed = False

    def log_mark(self) -> int:
        return len(self.server.log_text())

    def log_excerpt(self, mark: int, lines: int = 12) -> str:
        """The CDC's warnings and errors since ``mark``: its retries name what it is stuck on."""
        noisy = [line for line in self.server.log_text()[mark:].splitlines()
                 if " WARNING " in line or " ERROR " in line or "Traceback" in line]
        return "\n".join(f"  | {line[:300]}" for line in noisy[-lines:])

    def confirmed_ts(self) -> int | None:
        channels = self.server.task(self.task_id).get("channels") or []
        stamps = [c.get("confirmed_ts") for c in channels]
        return min(stamps) if stamps and all(stamps) else None

    # -- convergence ----------------------------------------------------------------------------------------

    def wait_same(self, prefix: str, scope: TaskScope, with_rows: bool, end_ts: int, timeout: float | None = None,
                  confirmed: bool = False) -> str | None:
        """Poll until the target's snapshot equals the source's as ``scope`` replicates it; None when it does, else
        the problem. ``confirmed`` also needs the CDC to have confirmed up to ``end_ts``: what a partial scope
        leaves out must not arrive later either.

        Gives up early when the task pauses, when the CDC confirmed everything up to ``end_ts`` more than
        ``caught_up_grace`` ago, or when its confirmed position has not moved for ``stall_timeout``: a failing
        sequence then costs well under the full timeout, which keeps shrinking affordable."""
        limits = self.limits
        start = time.monotonic()
        deadline = start + (timeout or limits.converge_timeout)
        caught_up_at, last_ts, last_move = None, None, start
        differences: list[str] = []
        source: dict | None = None
        while True:
            # The source is idle while the test waits: read it once (again only while it is still loading).
            if source is None or "'Loading'" in repr(source):
                source = snapshot(self.clients, "source", prefix, with_rows)
            if bad := source_self_check(source):
                return "\n".join(bad)
            target = _guarded(lambda: snapshot(self.clients, "target", prefix, with_rows))
            differences = diff(line_up(source, "source", scope), line_up(target, "target", scope)) \
                if isinstance(target, dict) else [f"target: {target}"]
            now = time.monotonic()
            confirmed_ts = _guarded(self.confirmed_ts)
            if isinstance(confirmed_ts, int):
                if confirmed_ts != last_ts:
                    last_ts, last_move = confirmed_ts, now
                if confirmed_ts >= end_ts and caught_up_at is None:
                    caught_up_at = now
            if not differences and (caught_up_at is not None or not confirmed):
                return None
            if problem := self.task_problem():
                return problem + "\n" + "\n".join(differences)
            why = None
            if any("'Loading'" in line for line in differences):
                caught_up_at = None  # the target is still loading: slow on a busy machine, not (yet) wrong
            elif caught_up_at is not None and now - caught_up_at > limits.caught_up_grace:
                why = (f"the CDC confirmed past the sequence's end {now - caught_up_at:.0f}s ago, but the target "
                       f"still differs")
            elif now - last_move > limits.stall_timeout:
                why = f"the CDC's confirmed position has not moved for {now - last_move:.0f}s"
            elif now > deadline:
                why = f"the target did not converge within {now - start:.0f}s"
            if why:
                shown = differences or ["no difference yet, but the CDC has not confirmed the sequence's end, so what "
                                        "the task leaves out may still arrive"]
                return f"{why}:\n" + "\n".join(f"  {line}" for line in shown)
            time.sleep(limits.poll_interval)


# ---------------------------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------------------------

def pick(items: list, index: int):
    return items[index % len(items)]


class ReplicationMachine(RuleBasedStateMachine):
    """One sequence: operations on the source only; the comparison and the clean-up run in teardown."""

    def __init__(self, harness: Harness):
        super().__init__()
        self.h = harness
        harness.examples += 1
        self.number = harness.examples
        self.started = time.monotonic()
        self.prefix = f"fz{uuid.uuid4().hex[:8]}"
        self.scope: TaskScope | None = None   # set with the task, before the first operation
        self.dbs: set[str] = set()
        self.collections: dict[tuple[str, str], CollectionModel] = {}
        self.ops: list[Op] = []
        self.log_start = harness.log_mark()
        self.timings: dict[str, float] = {}
        self.exception_at_start = sys.exc_info()[1]  # only an exception raised later means an abort
        self.lifecycle_done: Counter[str] = Counter()   # lifecycle steps of this sequence, per rule
        self.disrupted_in_step = False                  # a lifecycle step ran in the step under way
        self.quiet_steps = 0                            # steps in a row without one (for Lifecycle.every)
        self.finished = False                           # the sequence already ended as failed (in a step)

    # -- running operations on the source ---------------------------------------------------------------------

    def short(self, name: str) -> str:
        return name.removeprefix(self.prefix + "_")

    def src(self, db: str):
        return self.h.clients.get("source", db)

    def note(self, text: str) -> None:
        """A line in the sequence's history that is not an operation on the source."""
        self.ops.append(Op(f"-- {text} --", kind="note"))
        if self.h.verbose:
            self.h.out(f"      -- {text} --")

    def do(self, text: str, call: Callable[[], Any]) -> bool:
        """Run one operation on the source; a refusal is recorded and the history stays what it accepted."""
        import grpc
        from pymilvus.exceptions import MilvusException
        started = time.monotonic()
        op = Op(text)
        self.ops.append(op)
        try:
            call()
        except MilvusException as exc:
            op.refused = f"{type(exc).__name__}: {getattr(exc, 'message', str(exc))}"[:200]
        except grpc.RpcError as exc:  # pymilvus passes some codes (a deadline) through as they are
            op.refused = f"{exc.code().name}: {exc.details()}"[:200]
        op.seconds = time.monotonic() - started
        if self.h.verbose:
            self.h.out(f"      {op} ({op.seconds:.2f}s)")
        return op.refused is None

    def label(self, c: CollectionModel) -> str:
        return f"{c.db if c.db == DEFAULT_DB else self.short(c.db)}.{self.short(c.name)}"

    def refresh_load(self, c: CollectionModel) -> None:
        """Load states as the source has them (partition loads follow collection loads in ways the model
        need not guess)."""
        milvus = self.src(c.db)
        c.loaded = {p for p in c.partitions if load_state_of(milvus, c.name, p) == "Loaded"}

    # -- choosing -------------------------------------------------------------------------------------------

    def all_collections(self, where: Callable[[CollectionModel], bool] = lambda c: True) -> list[CollectionModel]:
        return [c for _, c in sorted(self.collections.items()) if where(c)]

    def choose(self, index: int, where: Callable[[CollectionModel], bool]) -> CollectionModel | None:
        """A collection that fits, or None: the step then does nothing. (Narrow preconditions would be cheaper
        steps, but hypothesis disables random rules per example, and when no enabled rule's precondition holds it
        throws the whole example away: seconds of work each time.)"""
        candidates = self.all_collections(where)
        return pick(candidates, index) if candidates else None

    def free_collection_slots(self) -> list[tuple[str, str]]:
        names = [f"{self.prefix}_c{i}" for i in range(COLLECTION_SLOTS)]
        return [(db, n) for db in [DEFAULT_DB, *sorted(self.dbs)] for n in names if (db, n) not in self.collections]

    def free_partition_slots(self, c: CollectionModel) -> list[str]:
        return [f"p{i}" for i in range(PARTITION_SLOTS) if f"p{i}" not in c.partitions]

    # -- databases -------------------------------------------------------------------------------------------

    def _create_database(self, slot: int) -> None:
        db = f"{self.prefix}_d{slot}"
        if self.do(f"create database {self.short(db)}", lambda: self.src(DEFAULT_DB).create_database(db)):
            self.dbs.add(db)

    def _drop_database(self, db: str) -> None:
        if self.do(f"drop database {self.short(db)}", lambda: self.src(DEFAULT_DB).drop_database(db)):
            self.dbs.discard(db)
            self.h.clients.forget_schema("source", db)

    def free_database_slots(self) -> list[int]:
        return [i for i in range(DB_SLOTS) if f"{self.prefix}_d{i}" not in self.dbs]

    @precondition(lambda self: self.free_database_slots())
    @rule(slot=st.integers(0, DB_SLOTS - 1))
    def create_database(self, slot: int) -> None:
        self._create_database(pick(self.free_database_slots(), slot))

    @precondition(lambda self: self.dbs)
    @rule(index=PICK)
    def drop_database(self, index: int) -> None:
        # Only an empty one (the source refuses the others); drop_collections_then_database empties one first.
        empty = [d for d in sorted(self.dbs) if not any(c.db == d for c in self.collections.values())]
        if empty:
            self._drop_database(pick(empty, index))

    @precondition(lambda self: self.dbs)
    @rule(index=PICK, load_first=st.booleans())
    def drop_collections_then_database(self, index: int, load_first: bool) -> None:
        """Drop every collection of a database (one of them loaded) and the database right after."""
        used = sorted({c.db for c in self.collections.values() if c.db != DEFAULT_DB})
        if not used:
            return
        db = pick(used, index)
        members = self.all_collections(lambda c: c.db == db)
        if load_first:
            self._index_and_load(members[0])
        for c in members:
            self._drop_collection(c)
        self._drop_database(db)

    # -- collections -----------------------------------------------------------------------------------------

    def _create_collection(self, db: str, name: str, spec: SchemaSpec) -> CollectionModel | None:
        milvus = self.src(db)
        kwargs: dict[str, Any] = {"shards_num": spec.shards, "consistency_level": spec.consistency}
        if spec.num_partitions:
            kwargs["num_partitions"] = spec.num_partitions
        model = CollectionModel(db, name, spec, partitions=set())
        if not self.do(f"create collection {self.label(model)} {spec}",
                       lambda: milvus.create_collection(name, schema=spec.to_milvus(), **kwargs)):
            return None
        self.h.clients.forget_schema("source", db, name)
        model.partitions = set(milvus.list_partitions(name))
        self.collections[(db, name)] = model
        return model

    def _drop_collection(self, c: CollectionModel) -> bool:
        loaded = " (loaded)" if c.loaded else ""
        if self.do(f"drop collection {self.label(c)}{loaded}", lambda: self.src(c.db).drop_collection(c.name)):
            del self.collections[(c.db, c.name)]
            self.h.clients.forget_schema("source", c.db, c.name)
            return True
        return False

    @initialize(choice=SCOPE_CHOICES, spec=schema_specs(), in_database=st.booleans())
    def first_collection(self, choice: ScopeChoice, spec: SchemaSpec, in_database: bool) -> None:
        """The sequence's task first (create answers once the task's start positions are pinned, so every later
        operation is replicated), then the first collection: in the database the scope names, or in the default
        one, which a scoped task leaves out."""
        scope = choice.resolve(self.prefix, self.h.next_mode())
        with self.timed("task"):
            self.h.ensure_task(scope)
        self.scope = scope
        self.note(f"task {scope}")
        db = DEFAULT_DB
        if in_database:
            self._create_database(choice.database)
            db = f"{self.prefix}_d{choice.database}" if self.dbs else DEFAULT_DB
        self._create_collection(db, f"{self.prefix}_c0", spec)

    @precondition(lambda self: self.free_collection_slots())
    @rule(index=PICK, spec=schema_specs())
    def create_collection(self, index: int, spec: SchemaSpec) -> None:
        db, name = pick(self.free_collection_slots(), index)
        self._create_collection(db, name, spec)

    @precondition(lambda self: self.collections)
    @rule(index=PICK)
    def drop_collection(self, index: int) -> None:
        self._drop_collection(pick(self.all_collections(), index))

    @precondition(lambda self: self.collections)
    @rule(index=PICK, spec=schema_specs(), rows=st.integers(0, 10), seed=SEED)
    def recreate_collection(self, index: int, spec: SchemaSpec, rows: int, seed: int) -> None:
        """Drop a collection and create the same name again at once, maybe with another schema and rows."""
        c = pick(self.all_collections(), index)
        if self._drop_collection(c) and (new := self._create_collection(c.db, c.name, spec)) and rows:
            self._insert(new, "", rows, seed)

    # -- partitions ------------------------------------------------------------------------------------------

    def _create_partition(self, c: CollectionModel, partition: str) -> bool:
        if self.do(f"create partition {self.label(c)}/{partition}",
                   lambda: self.src(c.db).create_partition(c.name, partition)):
            c.partitions.add(partition)
            self.refresh_load(c)
            return True
        return False

    def _drop_partition(self, c: CollectionModel, partition: str) -> None:
        loaded = " (loaded)" if partition in c.loaded else ""
        if self.do(f"drop partition {self.label(c)}/{partition}{loaded}",
                   lambda: self.src(c.db).drop_partition(c.name, partition)):
            c.partitions.discard(partition)
            c.keys = {k: p for k, p in c.keys.items() if p != partition}
            self.refresh_load(c)

    @precondition(lambda self: self.collections)
    @rule(index=PICK, slot=PICK)
    def create_partition(self, index: int, slot: int) -> None:
        if (c := self.choose(index, lambda c: not c.partition_keyed and self.free_partition_slots(c))) is None:
            return
        self._create_partition(c, pick(self.free_partition_slots(c), slot))

    @precondition(lambda self: self.collections)
    @rule(index=PICK, which=PICK)
    def drop_partition(self, index: int, which: int) -> None:
        if (c := self.choose(index, lambda c: c.user_partitions())) is None:
            return
        partition = pick(c.user_partitions(), which)
        if partition in c.loaded:  # the source refuses to drop a loaded partition: release it right before
            self._release_partitions(c, [partition])
        self._drop_partition(c, partition)

    @precondition(lambda self: self.collections)
    @rule(index=PICK, slot=PICK, rows=st.integers(1, 10), seed=SEED)
    def partition_lifecycle(self, index: int, slot: int, rows: int, seed: int) -> None:
        """load -> create partition -> insert into it -> release it -> drop it, back to back."""
        if (c := self.choose(index, lambda c: not c.partition_keyed and self.free_partition_slots(c))) is None:
            return
        partition = pick(self.free_partition_slots(c), slot)
        self._index_and_load(c)
        if self._create_partition(c, partition):
            self._insert(c, partition, rows, seed)
            self._release_partitions(c, [partition])
            self._drop_partition(c, partition)

    # -- indexes and loads --------------------------------------------------------------------------------------

    def _create_index(self, c: CollectionModel, index: IndexSpec) -> bool:
        milvus = self.src(c.db)
        params = milvus.prepare_index_params()
        extra = {"index_name": index.name} if index.name else {}
        params.add_index(c.spec.vector.name, index_type=index.index_type, metric_type=index.metric,
                         params=dict(index.params), **extra)
        if self.do(f"create index {self.label(c)}.{c.spec.vector.name} {index}",
                   lambda: milvus.create_index(c.name, params)):
            c.index = index
            return True
        return False

    def _load_collection(self, c: CollectionModel) -> None:
        if self.do(f"load collection {self.label(c)}", lambda: self.src(c.db).load_collection(c.name, timeout=90)):
            self.refresh_load(c)

    def _index_and_load(self, c: CollectionModel) -> None:
        if c.index is None:
            self._create_index(c, default_index(c.spec.binary))
        if c.loaded != c.partitions:
            self._load_collection(c)

    def _release_partitions(self, c: CollectionModel, partitions: list[str]) -> None:
        if self.do(f"release partitions {self.label(c)}/{','.join(partitions)}",
                   lambda: self.src(c.db).release_partitions(c.name, partitions)):
            self.refresh_load(c)

    @precondition(lambda self: self.collections)
    @rule(index=PICK, choice=INDEX_CHOICES)
    def create_index(self, index: int, choice: IndexChoice) -> None:
        if (c := self.choose(index, lambda c: c.index is None)) is None:
            return
        self._create_index(c, choice.resolve(c.spec.binary))

    @precondition(lambda self: self.collections)
    @rule(index=PICK)
    def drop_index(self, index: int) -> None:
        if (c := self.choose(index, lambda c: c.index is not None and not c.loaded)) is None:
            return
        name = c.index.name or c.spec.vector.name
        if self.do(f"drop index {self.label(c)}.{name}", lambda: self.src(c.db).drop_index(c.name, name)):
            c.index = None

    @precondition(lambda self: self.collections)
    @rule(index=PICK)
    def load_collection(self, index: int) -> None:
        if (c := self.choose(index, lambda c: c.index is not None)) is not None:
            self._load_collection(c)

    @precondition(lambda self: self.collections)
    @rule(index=PICK)
    def release_collection(self, index: int) -> None:
        if (c := self.choose(index, lambda c: c.loaded)) is None:
            return
        if self.do(f"release collection {self.label(c)}", lambda: self.src(c.db).release_collection(c.name)):
            self.refresh_load(c)

    @precondition(lambda self: self.collections)
    @rule(index=PICK, seed=SEED)
    def load_partitions(self, index: int, seed: int) -> None:
        if (c := self.choose(index, lambda c: c.index is not None and not c.partition_keyed)) is None:
            return
        rng = random.Random(seed)
        names = sorted(rng.sample(sorted(c.partitions), rng.randint(1, len(c.partitions))))
        if self.do(f"load partitions {self.label(c)}/{','.join(names)}",
                   lambda: self.src(c.db).load_partitions(c.name, names, timeout=90)):
            self.refresh_load(c)

    @precondition(lambda self: self.collections)
    @rule(index=PICK, seed=SEED)
    def release_partitions(self, index: int, seed: int) -> None:
        if (c := self.choose(index, lambda c: c.loaded and not c.partition_keyed)) is None:
            return
        rng = random.Random(seed)
        self._release_partitions(c, sorted(rng.sample(sorted(c.loaded), rng.randint(1, len(c.loaded)))))

    # -- data ------------------------------------------------------------------------------------------------

    def _insert(self, c: CollectionModel, partition: str, count: int, seed: int) -> None:
        rng = random.Random(seed)
        keys = [None] * count if c.spec.auto_id else c.fresh_keys(count)
        rows = [make_row(c.spec, k, rng) for k in keys]
        where = "" if c.partition_keyed else partition
        result: dict = {}

        def insert():
            result.update(self.src(c.db).insert(c.name, rows, partition_name=where or None))
        shown = f"/{where}" if where else ""
        if self.do(f"insert {count} row(s) into {self.label(c)}{shown}" +
                   ("" if c.spec.auto_id else f" keys {keys[0]!r}..{keys[-1]!r}"), insert):
            for key in result.get("ids", []):
                c.keys[key] = "" if c.partition_keyed else (where or "_default")

    @precondition(lambda self: self.collections)
    @rule(index=PICK, which=PICK, count=st.integers(1, 20), seed=SEED)
    def insert(self, index: int, which: int, count: int, seed: int) -> None:
        c = pick(self.all_collections(), index)
        self._insert(c, pick(sorted(c.partitions), which), count, seed)

    @precondition(lambda self: self.collections)
    @rule(index=PICK, count=st.integers(1, 5), by_partition=st.booleans(), seed=SEED)
    def delete_by_ids(self, index: int, count: int, by_partition: bool, seed: int) -> None:
        if (c := self.choose(index, lambda c: c.keys)) is None:
            return
        rng = random.Random(seed)
        keys = rng.sample(sorted(c.keys, key=str), min(count, len(c.keys)))
        partition = c.keys[keys[0]] if by_partition and not c.partition_keyed else ""
        if partition:
            keys = [k for k in keys if c.keys[k] == partition]
        shown = f" in {partition}" if partition else ""
        if self.do(f"delete {self.label(c)} ids {keys}{shown}",
                   lambda: self.src(c.db).delete(c.name, ids=keys, partition_name=partition or None)):
            for k in keys:
                c.keys.pop(k, None)

    @precondition(lambda self: self.collections)
    @rule(index=PICK, seed=SEED)
    def delete_by_expression(self, index: int, seed: int) -> None:
        if (c := self.choose(index, lambda c: c.loaded)) is None:
            return
        expression = delete_expression(c.spec, random.Random(seed))
        # The model keeps the keys: it only uses them to choose arguments, and a deleted key stays in its
        # partition for an upsert, so no key is ever duplicated.
        self.do(f"delete {self.label(c)} where {expression}",
                lambda: self.src(c.db).delete(c.name, filter=expression))

    @precondition(lambda self: self.collections)
    @rule(index=PICK, which=PICK, count=st.integers(1, 10), seed=SEED)
    def upsert(self, index: int, which: int, count: int, seed: int) -> None:
        if (c := self.choose(index, lambda c: not c.spec.auto_id)) is None:
            return
        rng = random.Random(seed)
        partition = "" if c.partition_keyed else pick(sorted(c.partitions), which)
        # Keys of this partition only (Milvus 2.3 would keep a moved key's old row), plus new ones.
        own = sorted((k for k, p in c.keys.items() if p == partition), key=str)
        keys = rng.sample(own, min(len(own), rng.randint(0, count))) if own else []
        keys += c.fresh_keys(count - len(keys))
        rows = [make_row(c.spec, k, rng) for k in keys]
        shown = f"/{partition}" if partition else ""
        if self.do(f"upsert {len(rows)} row(s) into {self.label(c)}{shown} keys {keys}",
                   lambda: self.src(c.db).upsert(c.name, rows, partition_name=partition or None)):
            for k in keys:
                c.keys[k] = partition

    @precondition(lambda self: self.collections)
    @rule(index=PICK)
    def flush(self, index: int) -> None:
        c = pick(self.all_collections(), index)
        # The Flush request is what is replicated, so the seal is not awaited (_async). A source whose datanode
        # has not watched a new collection's channel yet retries inside the server every 3 s, for up to a
        # minute on a busy machine: one try with a short deadline (a float timeout, or pymilvus would retry
        # until it) records that as refused. A flush changes nothing the comparison sees.
        self.do(f"flush {self.label(c)}", lambda: self.src(c.db).flush(c.name, timeout=1.5, retry_times=0,
                                                                      _async=True))

    # -- the task's lifecycle -----------------------------------------------------------------------------------

    def _lifecycle(self, kind: str, forced: str = "") -> None:
        """Disrupt the sequence's task (LIFECYCLE_TEXT) and go on with the source at once: no wait for the target.
        If the CDC refuses or does not come back, the sequence ends here as failed. ``forced`` says why a step no
        rule drew runs."""
        h = self.h
        op = Op(f"[cdc] {LIFECYCLE_TEXT[kind]}" + (f" (forced: {forced})" if forced else ""), kind="cdc")
        self.ops.append(op)
        started = time.monotonic()
        try:
            if kind == "pause_resume":
                h.pause_resume()
            else:
                h.restart_server("kill" if kind == "kill_restart" else "stop")
        except Exception as exc:  # noqa: BLE001 - the CDC failing a lifecycle step is a finding, reported in full
            op.seconds = time.monotonic() - started
            task = _guarded(lambda: h.server.task(h.task_id))
            shown = f"{task.get('state')}: {task.get('reason')}" if isinstance(task, dict) else task
            self.abort(f"the lifecycle step {kind} failed: {type(exc).__name__}: {str(exc)[:600]}\n"
                       f"  the task now: {shown}")
        op.seconds = time.monotonic() - started
        self.lifecycle_done[kind] += 1
        h.lifecycle_counts[kind] += 1
        self.disrupted_in_step = True
        if h.verbose:
            h.out(f"      {op} ({op.seconds:.2f}s)")

    def _acts(self, roll: int) -> bool:
        """A drawn lifecycle rule acts with probability Lifecycle.rate: a roll shrinks towards 0, which acts."""
        return roll < self.h.lifecycle.rate * 1000

    @rule(roll=st.integers(0, 999))
    def pause_resume(self, roll: int) -> None:
        if self._acts(roll):
            self._lifecycle("pause_resume")

    @rule(roll=st.integers(0, 999))
    def kill_restart(self, roll: int) -> None:
        if self._acts(roll):
            self._lifecycle("kill_restart")

    @rule(roll=st.integers(0, 999))
    def stop_restart(self, roll: int) -> None:
        if self._acts(roll):
            self._lifecycle("stop_restart")

    @invariant()
    def lifecycle_floor(self) -> None:
        """Runs after every step (not a check): with Lifecycle.every, forces a lifecycle step once that many steps in
        a row had none. Deterministic for a given sequence of steps, so a replay does the same."""
        every = self.h.lifecycle.every
        if self.scope is None or self.finished:  # before the first step (no task yet)
            return
        if self.disrupted_in_step:
            self.disrupted_in_step, self.quiet_steps = False, 0
            return
        self.quiet_steps += 1
        kinds = self.h.lifecycle.kinds
        if every and kinds and self.quiet_steps >= every:
            self._lifecycle(self._least_done(), forced=f"{every} step(s) without one")
            self.disrupted_in_step, self.quiet_steps = False, 0

    def _least_done(self) -> str:
        kinds = self.h.lifecycle.kinds
        return min(kinds, key=lambda k: (self.lifecycle_done[k], LIFECYCLE_RULES.index(k)))

    def lifecycle_at_end(self) -> None:
        """With Lifecycle.every, a sequence that had no lifecycle step (hypothesis also draws sequences shorter than
        ``every`` steps) gets one after its last operation, before the comparison waits for the target."""
        if not self.h.lifecycle.every or not self.h.lifecycle.kinds or self.lifecycle_done:
            return
        with contextlib.suppress(UnsatisfiedAssumption):  # keep_going: abort recorded the failure
            self._lifecycle(self._least_done(), forced="the sequence had none")

    def abort(self, problem: str) -> None:
        """End the sequence in the middle of a step as failed: its history so far is the report."""
        with contextlib.suppress(Exception):
            self.clean_up(wait=False)
        if excerpt := self.h.log_excerpt(self.log_start):
            problem += "\nCDC log (warnings and errors during the sequence):\n" + excerpt
        self.finished = True
        self.finish(problem)
        reject()  # keep_going: the failure is recorded; the rest of this example is thrown away, the run goes on

    # -- the end of a sequence ----------------------------------------------------------------------------------

    def final_index_and_load(self) -> None:
        """Rows can only be read from loaded collections: index and load everything on the source, which the
        CDC replicates like any other operation. The loads run side by side (each takes seconds)."""
        if not self.collections:
            return
        self.note("final phase: index and load every collection on the source, compare rows")
        for c in self.all_collections(lambda c: c.index is None):
            if not self._create_index(c, default_index(c.spec.binary)):
                raise AssertionError(f"test bug: the source refused an index on {self.label(c)}: {self.ops[-1]}")
        loading = self.all_collections(lambda c: c.loaded != c.partitions)
        for c in loading:
            if not self.do(f"load collection {self.label(c)}",
                           lambda c=c: self.src(c.db).load_collection(c.name, timeout=90, _async=True)):
                raise AssertionError(f"test bug: the source refused to load {self.label(c)}: {self.ops[-1]}")

        def all_loaded() -> bool:
            for c in loading:
                self.refresh_load(c)
            return all(c.loaded == c.partitions for c in loading)
        wait_until(all_loaded, 120, 0.2, what="the source to load every collection")

    def compare(self) -> str | None:
        """Metadata first (rows need loaded collections), then load everything on the source and compare rows."""
        h = self.h
        try:
            with self.timed("settle"):
                problem = h.wait_same(self.prefix, self.scope, with_rows=False, end_ts=hybrid_now(),
                                      confirmed=self.scope.partial)
            if problem is None:
                with self.timed("final"):
                    self.final_index_and_load()
                with self.timed("rows"):
                    problem = h.wait_same(self.prefix, self.scope, with_rows=True, end_ts=hybrid_now(),
                                          confirmed=self.scope.partial)
            if problem is None:
                with self.timed("verify"):
                    problem = self.verify()
            return problem
        except Exception as exc:  # noqa: BLE001 - a broken comparison is reported like a difference
            return f"the comparison raised {type(exc).__name__}: {exc}"

    def verify(self) -> str | None:
        """The server's own verify request over this sequence's collections must agree with the comparison above:
        the two keep each other honest."""
        h = self.h
        databases = [DEFAULT_DB, *(d for d in self.src(DEFAULT_DB).list_databases() if d.startswith(self.prefix))]
        if self.scope.mode == "scoped":  # the task replicates one database only
            databases = [d for d in databases if d == self.scope.database]
        names = [f"{db}.{name}" for db in databases
                 for name in self.src(db).list_collections() if name.startswith(self.prefix)]
        if not names:
            return None
        h.server.call("verify", task_id=h.task_id, collections=names)
        result = wait_until(lambda: (v := h.server.task(h.task_id).get("verify")) and v["state"] != "running" and v,
                            300, 0.5, what="verify to end")
        if result["state"] != "equal":
            return f"verify answered {result['state']} where the comparison found the copy equal: {result}"
        return None

    def clean_up(self, wait: bool) -> str | None:
        """Drop what the sequence created, as the source lists it (not as the model believes): collections
        first (Milvus 2.3 drops loaded ones as they are), then, once the target dropped them too, the databases.
        Waiting in between keeps the clean-up from racing the CDC: that race is a rule of its own
        (drop_collections_then_database). Without a task (the example ended before it had one) there is nothing to
        wait for."""
        h = self.h
        wait = wait and self.scope is not None
        self.note("teardown: drop the collections, wait for the target, then drop the databases")
        dbs = [d for d in self.src(DEFAULT_DB).list_databases() if d.startswith(self.prefix)]
        for db in [DEFAULT_DB, *dbs]:
            milvus = self.src(db)
            for name in [n for n in milvus.list_collections() if n.startswith(self.prefix)]:
                label = f"{db if db == DEFAULT_DB else self.short(db)}.{self.short(name)}"
                self.do(f"drop collection {label}", lambda m=milvus, n=name: m.drop_collection(n))
                h.clients.forget_schema("source", db, name)
        if wait and (problem := h.wait_same(self.prefix, self.scope, False, hybrid_now(),
                                            h.limits.teardown_timeout)):
            return "after the teardown dropped the collections: " + problem
        for db in dbs:
            self._drop_database(db)
        if wait and dbs and (problem := h.wait_same(self.prefix, self.scope, False, hybrid_now(),
                                                     h.limits.teardown_timeout)):
            return "after the teardown dropped the databases: " + problem
        return None

    @contextlib.contextmanager
    def timed(self, phase: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.monotonic() - started

    def teardown(self) -> None:
        if self.finished:  # failed in a step (abort): reported and tidied already
            return
        if sys.exc_info()[1] not in (None, self.exception_at_start):
            # Hypothesis aborted this example (an invalid draw; it does not count as a sequence), or a rule
            # raised: no comparison, only a tidy stack; the exception goes on.
            with contextlib.suppress(Exception):
                if self.clean_up(wait=True) is not None:
                    self.h.fresh_task_needed = True
            self.h.out(f"[aborted {self.number}] {len(self.ops)} op(s): {sys.exc_info()[0].__name__}")
            return
        self.lifecycle_at_end()
        if self.finished:
            return
        self.timings["operations"] = time.monotonic() - self.started - self.timings.get("task", 0.0)
        problem = self.compare()
        with self.timed("teardown"):
            if problem is None:
                try:
                    problem = self.clean_up(wait=True)
                except Exception as exc:  # noqa: BLE001
                    problem = f"the clean-up raised {type(exc).__name__}: {exc}"
            else:
                with contextlib.suppress(Exception):
                    self.clean_up(wait=False)
        if problem is not None and (excerpt := self.h.log_excerpt(self.log_start)):
            problem += "\nCDC log (warnings and errors during the sequence):\n" + excerpt
        self.finish(problem)

    def finish(self, problem: str | None) -> None:
        h = self.h
        seconds = time.monotonic() - self.started
        h.durations.append(seconds)
        refused = sum(1 for o in self.ops if o.refused)
        phase = "shrink" if h.failures and not h.keep_going else "sequence"
        h.mode_counts[self.scope.mode] += 1
        lifecycle = sum(self.lifecycle_done.values())
        h.disrupted += lifecycle > 0
        cdc = f"{lifecycle} lifecycle step(s) " + (f"({', '.join(f'{k} {v}' for k, v in self.lifecycle_done.items())})"
                                                   if lifecycle else "")
        status = "ok" if problem is None else "FAILED: " + problem.splitlines()[0][:160]
        spent = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        slowest = max((o for o in self.ops if o.kind == "source"), key=lambda o: o.seconds, default=None)
        slow = f"; slowest op {slowest.text.split(' [')[0][:40]!r} {slowest.seconds:.1f}s" if slowest else ""
        ops = sum(1 for o in self.ops if o.kind == "source")
        h.source_ops, h.refused_ops = h.source_ops + ops, h.refused_ops + refused
        h.out(f"[{phase} {self.number} {self.scope.mode}] {ops} op(s), {refused} refused, {cdc.strip()}, "
              f"{seconds:.1f}s ({spent}{slow}), {status}")
        if problem is None:
            return
        h.fresh_task_needed = True
        failure = Failure(self.number, self.scope.mode, list(self.ops), problem)
        h.failures.append(failure)
        if not h.keep_going:
            raise AssertionError(failure.report())


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------

@dataclass
class FuzzResult:
    seed: int
    sequences: int
    steps: int
    elapsed: float
    examples: int
    failures: list[Failure]
    minimal: Failure | None
    durations: list[float]
    modes: dict[str, int]   # sequences compared under each task scope, shrink attempts included
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    lifecycle_counts: dict[str, int] = field(default_factory=dict)   # lifecycle steps done, per rule
    disrupted: int = 0      # sequences compared that had at least one lifecycle step
    source_ops: int = 0     # operations on the source of the sequences compared (teardown included)
    refused_ops: int = 0    # of them refused by the source
    keep_going: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        per = f", {sum(self.durations) / len(self.durations):.1f}s per sequence" if self.durations else ""
        modes = ",".join(f"{mode}:{count}" for mode, count in self.modes.items())
        done = ",".join(f"{kind}:{self.lifecycle_counts.get(kind, 0)}" for kind in self.lifecycle.kinds)
        return (f"seed={self.seed} sequences={self.sequences} steps={self.steps} elapsed={self.elapsed:.1f}s "
                f"examples_run={self.examples}{per} modes={modes} source_ops={self.source_ops} "
                f"refused={self.refused_ops} lifecycle_rate={self.lifecycle.rate:g} "
                f"lifecycle_every={self.lifecycle.every} lifecycle={done or 'none'} "
                f"disrupted_sequences={self.disrupted}/{len(self.durations)} failures={len(self.failures)}")

    def kinds(self) -> dict[str, Failure]:
        """The shortest failing sequence of each kind of failure met (shrinking may wander between bugs)."""
        shortest: dict[str, Failure] = {}
        for f in self.failures:
            if f.kind not in shortest or len(f.ops) < len(shortest[f.kind].ops):
                shortest[f.kind] = f
        return shortest

    def report(self) -> str:
        """The shrunk failing sequence, any other kind of failure met, and the summary line last; when the run kept
        going, every failing sequence as it ran, the shortest first."""
        lines = []
        if self.keep_going:
            for f in sorted(self.failures, key=lambda f: (len(f.ops), f.number)):
                lines += [f"sequence {f.number} ({f.mode}), not shrunk:", f.report(), ""]
            return "\n".join(lines + [self.summary()])
        if self.minimal is not None:
            lines += [self.minimal.report(), ""]
        others = [f for f in self.kinds().values() if self.minimal is None or f.kind != self.minimal.kind]
        for f in others:
            lines += [f"another kind of failure was met on the way ({f.kind}); its shortest sequence:",
                      f.report(), ""]
        return "\n".join(lines + [self.summary()])


def quiet_pymilvus() -> None:
    """pymilvus logs every refused call at ERROR; refusals are expected here and recorded per operation. (Its
    import configures its loggers, so import it first.)"""
    importlib.import_module("pymilvus")
    for name in ("pymilvus", "pymilvus.milvus_client"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def machine_class(skip: list[str]) -> type[ReplicationMachine]:
    """The machine without the named rules: a known divergence that every sequence hits hides the others."""
    unknown = [name for name in skip if not callable(getattr(ReplicationMachine, name, None))]
    if unknown:
        raise ValueError(f"no such rule: {', '.join(unknown)}")
    return type("ReplicationMachine", (ReplicationMachine,), {name: None for name in skip}) if skip \
        else ReplicationMachine


def task_modes(mode: str) -> tuple[str, ...]:
    """The task scopes a run's sequences are drawn from: one, or all (``mixed``)."""
    if mode == "mixed":
        return MODES
    if mode not in MODES:
        raise ValueError(f"no such mode: {mode} (expected {', '.join(MODES)} or mixed)")
    return (mode,)


def run_fuzz(endpoints: dict, workdir: Path, sequences: int, steps: int, seed: int | None = None,
             limits: Limits | None = None, shrink_seconds: int | None = None, out: Callable[[str], None] = print,
             verbose: bool = False, skip: list[str] | None = None, cdc_settings: dict | None = None,
             mode: str = "mixed", lifecycle_rate: float = DEFAULT_LIFECYCLE_RATE,
             lifecycle_every: int = 0, keep_going: bool = False) -> FuzzResult:
    """Run ``sequences`` random sequences of about ``steps`` operations, each under a task of a scope drawn from
    ``mode``, with the task's lifecycle disrupted as ``lifecycle_rate`` and ``lifecycle_every`` say (Lifecycle);
    shrink the first failure, or with ``keep_going`` record every failing sequence as it ran and go on."""
    quiet_pymilvus()
    skip = list(skip or [])
    if not 0 <= lifecycle_rate <= 1 or lifecycle_every < 0:
        raise ValueError(f"lifecycle rate {lifecycle_rate} (0 to 1) or every {lifecycle_every} (>= 0) out of range")
    lifecycle = Lifecycle(lifecycle_rate, lifecycle_every, tuple(k for k in LIFECYCLE_RULES if k not in skip))
    # At rate 0 the lifecycle rules would only be steps that do nothing: left out (a forced step still may run).
    machine = machine_class(skip + [k for k in lifecycle.kinds if lifecycle_rate == 0])
    modes = task_modes(mode)
    seed = random.randrange(1 << 32) if seed is None else seed
    harness = Harness(endpoints, workdir, limits, out, verbose, cdc_settings, modes, lifecycle, keep_going).start()
    started = time.monotonic()
    minimal: Failure | None = None
    try:
        def factory() -> ReplicationMachine:
            return machine(harness)
        hypothesis_seed(seed)(factory)
        config = settings(max_examples=sequences, stateful_step_count=steps, deadline=None, database=None,
                          phases=[Phase.explicit, Phase.generate, Phase.shrink], verbosity=Verbosity.quiet,
                          suppress_health_check=list(HealthCheck), report_multiple_bugs=False, print_blob=False)
        with shrink_limit(shrink_seconds):
            try:
                run_state_machine_as_test(factory, settings=config)
            except Flaky:
                # A failure that did not come back on replay (timing-dependent): report the shortest one recorded.
                # Without any, the flakiness is the test's own (a rule raised once): that must not pass.
                if not harness.failures:
                    raise
                minimal = min(harness.failures, key=lambda f: (len(f.ops), f.number))
            except AssertionError:
                # Hypothesis ends by replaying the shrunk sequence; its failure is the last one recorded.
                minimal = harness.failures[-1] if harness.failures else None
                if minimal is None:
                    raise
        if keep_going and harness.failures:
            minimal = min(harness.failures, key=lambda f: (len(f.ops), f.number))
    finally:
        harness.close()
    return FuzzResult(seed, sequences, steps, time.monotonic() - started, harness.examples, harness.failures, minimal,
                      harness.durations, {m: harness.mode_counts[m] for m in modes}, lifecycle,
                      dict(harness.lifecycle_counts), harness.disrupted, harness.source_ops, harness.refused_ops,
                      keep_going)


@contextlib.contextmanager
def shrink_limit(seconds: int | None):
    """Hypothesis stops shrinking after engine.MAX_SHRINKING_SECONDS (documented as monkeypatchable); a step here
    costs seconds, so callers choose their own budget."""
    from hypothesis.internal.conjecture import engine
    saved = engine.MAX_SHRINKING_SECONDS
    if seconds is not None:
        engine.MAX_SHRINKING_SECONDS = seconds
    try:
        yield
    finally:
        engine.MAX_SHRINKING_SECONDS = saved


@contextlib.contextmanager
def stack_endpoints():
    """The stack named by CDC_TEST_STACK, else one started (and stopped) here."""
    reuse = os.environ.get("CDC_TEST_STACK")
    if reuse:
        yield json.loads(Path(reuse).read_text())["endpoints"]
        return
    from stack import Stack
    running = Stack(Path(tempfile.mkdtemp(prefix="milvus-cdc-fuzz-stack-")), with_pulsar=False)
    try:
        yield running.up()
    finally:
        running.down()


@contextlib.contextmanager
def own_target(endpoints: dict, wanted: bool):
    """The endpoints, with a target Milvus of this run's own when ``wanted`` (stack.ExtraTarget on the stack's etcd,
    stopped afterwards). A run sharing the stack with other tests needs one: another test's ``*`` task copies the
    sequences' operations into the stack's target a second time (and this run's ``*`` tasks copy that test's)."""
    if not wanted:
        yield endpoints
        return
    from stack import ExtraTarget
    with ExtraTarget(endpoints, 0) as target:
        yield {**endpoints, "target_milvus": target.uri}


def skipped_rules(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=20, help="random sequences to run (default 20)")
    parser.add_argument("--steps", type=int, default=25, help="rules per sequence (default 25)")
    parser.add_argument("--seed", type=int, help="hypothesis seed (default: random, printed)")
    parser.add_argument("--mode", choices=[*MODES, "mixed"], default=os.environ.get("CDC_FUZZ_MODE", "mixed"),
                        help="the task each sequence runs under: every collection (star), one database of the "
                             "sequence (scoped), everything with one database and some collections renamed "
                             "(mapped), or the three in turn (mixed, the default; env CDC_FUZZ_MODE)")
    parser.add_argument("--shrink-seconds", type=int, default=600, help="shrinking budget (default 600)")
    parser.add_argument("--skip", default=os.environ.get("CDC_FUZZ_SKIP"),
                        help="comma-separated rules to leave out (env CDC_FUZZ_SKIP), to look past a known failure")
    parser.add_argument("--lifecycle", type=float,
                        default=float(os.environ.get("CDC_FUZZ_LIFECYCLE") or DEFAULT_LIFECYCLE_RATE),
                        help="probability that a drawn lifecycle rule (pause_resume, kill_restart, stop_restart) "
                             f"acts; 0 leaves them out (default {DEFAULT_LIFECYCLE_RATE:g}; env CDC_FUZZ_LIFECYCLE)")
    parser.add_argument("--lifecycle-every", type=int, default=int(os.environ.get("CDC_FUZZ_LIFECYCLE_EVERY") or 0),
                        metavar="N", help="force a lifecycle step after N steps in a row without one, and after the "
                                          "last step of a sequence that had none (default 0: never; env "
                                          "CDC_FUZZ_LIFECYCLE_EVERY)")
    parser.add_argument("--keep-going", action="store_true", default=bool(os.environ.get("CDC_FUZZ_KEEP_GOING")),
                        help="record a failing sequence and go on with the next, without shrinking: the report "
                             "shows the shortest failing sequence of each kind (env CDC_FUZZ_KEEP_GOING)")
    parser.add_argument("--own-target", action="store_true", default=bool(os.environ.get("CDC_FUZZ_OWN_TARGET")),
                        help="replicate into a target Milvus started for the run on the stack's etcd, not the stack's "
                             "target: for a stack other tests use at the same time (env CDC_FUZZ_OWN_TARGET)")
    parser.add_argument("--workdir", help="where the CDC server keeps its config, meta store and log "
                                          "(default: a temporary directory, removed afterwards)")
    parser.add_argument("--verbose", action="store_true", help="print every operation as it runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a CDC config key for the run (YAML value), e.g. replication.callsPerChannel=4")
    args = parser.parse_args(argv)
    with stack_endpoints() as shared, own_target(shared, args.own_target) as endpoints, \
            contextlib.ExitStack() as cleanup:
        workdir = Path(args.workdir) if args.workdir else \
            Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="milvus-cdc-fuzz-")))
        print(f"engine {engine_script()}; CDC log {workdir / 'server.log'}; target {endpoints['target_milvus']}",
              flush=True)
        result = run_fuzz(endpoints, workdir, args.sequences, args.steps, args.seed,
                          shrink_seconds=args.shrink_seconds, verbose=args.verbose, skip=skipped_rules(args.skip),
                          out=lambda line: print(line, flush=True), mode=args.mode,
                          lifecycle_rate=args.lifecycle, lifecycle_every=args.lifecycle_every,
                          keep_going=args.keep_going,
                          cdc_settings={k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)})
    print("\n" + result.report())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
