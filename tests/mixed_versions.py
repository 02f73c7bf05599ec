"""Replication between two Milvus versions: a 2.3.2 source into a 2.3.5 target, and a 2.3.5 source into a
2.3.2 target, through a real milvus_cdc.py server with one ``*`` task.

    python tests/mixed_versions.py                        # both directions, one stack after the other
    python tests/mixed_versions.py --direction 2.3.5:2.3.2  # one direction (SOURCE:TARGET), repeatable
    python tests/mixed_versions.py --out /tmp/mixed-out     # where logs and report.json go

For each direction it starts its own stack (tests/stack.py: etcd, Tansu, a source Milvus of one version on
Kafka, a ttMsgEnabled=false target of the other; no Pulsar), a CDC server (helpers.CdcServer with
helpers.server_config) and a ``*`` task, then does on the source, waiting after each step until the target
shows the same or a timeout passes (a paused task ends the wait at once):

    create database; create a collection in it (every scalar type but arrays, JSON, a float vector, dynamic
    field, 2 shards); 2 partitions; create 2 indexes (one with an explicit name, one with NO name, so that
    each Milvus picks its default); load; insert into every partition; delete; release; drop each index by
    the name the source lists for it; flush; drop a partition; drop the collection; drop the database.

Compared after each step: database list, schema, partitions, index names and describe_index params, load
state of the collection and its partitions, rows (every field, by primary key), persisted row counts, and
the task's state. Then it reads what the source wrote under the CDC: the CreateIndex / DropIndex requests on
the source's replicate channel (Kafka topic ``by-dev-replicate-msg``, decoded as milvus_pb2 requests) and the
index records of both Milvus in etcd (``{root}/meta/field-index/{collID}/{indexID}``), and quotes the CDC
server's log lines about indexes and its warnings and errors.

It prints one result line per direction (``RESULT 2.3.2 -> 2.3.5: OK ...`` or ``... DIFFERS ...`` with every
difference) and exits 1 when any direction differs, 2 when a stack could not start. Everything lands in
``--out/<source>-to-<target>/`` (report.json, cdc server.log, the Milvus logs); what it started is stopped.

The stack's state file is ``stack.STATE_FILE`` (env MILVUS_CDC_STACK_STATE); it is written while a stack is
up, so ``MILVUS_CDC_STACK_STATE=... python tests/stack.py down`` cleans up after a killed run, and the script
refuses to start while that file exists. A version other than the installed ``milvus`` package's (2.3.5) is
installed from PyPI into its own venv on first use (see ``stack.milvus_package``). One direction takes about
1.5 to 2.5 minutes on 2 cores. tests/test_mixed_versions.py runs the same under pytest (``-m mixed``, only
with CDC_MIXED_VERSIONS=1).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stack as stack_module  # noqa: E402
from helpers import (CdcServer, client, field_indexes_in_etcd, indexes_of, load_state_of,  # noqa: E402
                     replicate_channel_ops, rows_of, schema_of, server_config)

DIRECTIONS = (("2.3.2", "2.3.5"), ("2.3.5", "2.3.2"))
FIELDS = ["id", "b", "i8", "i16", "i32", "i64", "f", "d", "s", "j", "v", "extra"]
STEP_TIMEOUT = 60.0


class StackStartError(RuntimeError):
    pass


@dataclass
class Run:
    """One direction: the stack, the CDC server, the clients, and what was found."""
    source_version: str
    target_version: str
    out: Path
    endpoints: dict = field(default_factory=dict)
    server: CdcServer | None = None
    task_id: str = ""
    checks: list = field(default_factory=list)
    differences: list = field(default_factory=list)
    findings: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.source_version} -> {self.target_version}"

    # -- waiting for the target to show what the source shows ------------------------------------------------

    def task_state(self) -> tuple[str, str]:
        try:
            task = self.server.task(self.task_id)
            return task["state"], task.get("reason") or ""
        except Exception as exc:  # noqa: BLE001
            return "unknown", repr(exc)

    def expect(self, step: str, source_value, target_fn, timeout: float = STEP_TIMEOUT) -> bool:
        """Wait until ``target_fn()`` equals the source's value; record a difference when it never does."""
        began = time.monotonic()
        deadline = began + timeout
        got = None
        while True:
            try:
                got = target_fn()
            except Exception as exc:  # noqa: BLE001 - not there yet, or the target refuses: keep the answer
                got = f"error: {exc!r}"[:600]
            if got == source_value:
                self.checks.append({"step": step, "ok": True, "seconds": round(time.monotonic() - began, 1)})
                return True
            if time.monotonic() > deadline or self.task_state()[0] == "Paused":
                break
            time.sleep(0.5)
        state, reason = self.task_state()
        self.checks.append({"step": step, "ok": False, "seconds": round(time.monotonic() - began, 1)})
        self.differences.append({"step": step, "source": source_value, "target": got, "task_state": state,
                                 "task_reason": reason})
        print(f"  DIFF {step}: source {short(source_value)} / target {short(got)}"
              + (f" / task {state}: {reason}" if state != "Running" else ""), flush=True)
        return False

    # -- the scenario ---------------------------------------------------------------------------------------

    def scenario(self) -> None:
        from pymilvus import DataType, MilvusClient
        ep = self.endpoints
        src_root, tgt_root = client(ep["source_milvus"]), client(ep["target_milvus"])
        for side, c, version in (("source", src_root, self.source_version),
                                 ("target", tgt_root, self.target_version)):
            reported = c.get_server_version()
            self.findings[f"{side}_server_version"] = reported
            if version not in reported:
                raise AssertionError(f"the {side} reports {reported}, not {version}")

        tag = uuid.uuid4().hex[:8]
        db, name = f"mixed_db_{tag}", f"mixed_{tag}"
        self.findings.update(database=db, collection=name)

        step("create database")
        src_root.create_database(db)
        self.expect("database created", True, lambda: db in tgt_root.list_databases())
        src, tgt = client(ep["source_milvus"], db), client(ep["target_milvus"], db)

        step("create collection")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True, description="mixed versions")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("b", DataType.BOOL)
        schema.add_field("i8", DataType.INT8)
        schema.add_field("i16", DataType.INT16)
        schema.add_field("i32", DataType.INT32)
        schema.add_field("i64", DataType.INT64)
        schema.add_field("f", DataType.FLOAT)
        schema.add_field("d", DataType.DOUBLE)
        schema.add_field("s", DataType.VARCHAR, max_length=64)
        schema.add_field("j", DataType.JSON)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=8)
        src.create_collection(name, schema=schema, shards_num=2, consistency_level="Strong")
        self.expect("schema", schema_of(src, name), lambda: schema_of(tgt, name))

        step("create partitions")
        for partition in ("p1", "p2"):
            src.create_partition(name, partition)
        self.expect("partitions", sorted(src.list_partitions(name)), lambda: sorted(tgt.list_partitions(name)))

        step("create indexes (v: no name; s: named s_trie)")
        params = src.prepare_index_params()
        params.add_index("v", index_type="IVF_FLAT", metric_type="L2", params={"nlist": 16})  # no index name
        src.create_index(name, params)
        params = src.prepare_index_params()
        params.add_index("s", index_type="Trie", index_name="s_trie")
        src.create_index(name, params)
        source_indexes = indexes_of(src, name)
        unnamed = next(n for n, d in source_indexes.items() if d.get("field_name") == "v")
        self.findings["source_index_names"] = sorted(source_indexes)
        self.findings["source_name_of_the_unnamed_index"] = unnamed
        self.expect("indexes after create", source_indexes, lambda: indexes_of(tgt, name))
        self.findings["target_index_names_after_create"] = sorted(safe(lambda: indexes_of(tgt, name), {}))
        self.findings["etcd_after_create"] = self.etcd_indexes(src, tgt, name)

        step("load")
        src.load_collection(name)
        loaded = {p: load_state_of(src, name, p) for p in (None, "_default", "p1", "p2")}
        self.expect("load state after load", loaded,
                    lambda: {p: load_state_of(tgt, name, p) for p in (None, "_default", "p1", "p2")}, 90)

        step("insert")
        src.insert(name, make_rows(0, 200))
        src.insert(name, make_rows(1000, 100), partition_name="p1")
        src.insert(name, make_rows(2000, 50), partition_name="p2")
        expected = rows_of(src, name, FIELDS)
        self.expect("rows after insert", expected, lambda: rows_of(tgt, name, FIELDS))

        step("delete")
        src.delete(name, ids=list(range(0, 200, 5)))
        src.delete(name, ids=[1000, 1001, 2049])
        expected = rows_of(src, name, FIELDS)
        self.findings["rows_after_delete"] = len(expected)
        self.expect("rows after delete", expected, lambda: rows_of(tgt, name, FIELDS))
        self.expect("p1 rows after delete", rows_of(src, name, ["id", "s"], partition="p1"),
                    lambda: rows_of(tgt, name, ["id", "s"], partition="p1"))

        step("release")
        src.release_collection(name)
        released = {p: load_state_of(src, name, p) for p in (None, "p1", "p2")}
        self.expect("load state after release", released,
                    lambda: {p: load_state_of(tgt, name, p) for p in (None, "p1", "p2")})

        step(f"drop index {unnamed!r} (the source's name for the unnamed index of v)")
        src.drop_index(name, unnamed)
        self.expect(f"indexes after dropping {unnamed}", indexes_of(src, name), lambda: indexes_of(tgt, name))
        self.findings["target_index_names_after_unnamed_drop"] = sorted(safe(lambda: indexes_of(tgt, name), {}))
        self.findings["etcd_after_unnamed_drop"] = self.etcd_indexes(src, tgt, name)

        step("drop index 's_trie'")
        src.drop_index(name, "s_trie")
        self.expect("indexes after dropping s_trie", indexes_of(src, name), lambda: indexes_of(tgt, name))
        self.findings["target_index_names_after_drops"] = sorted(safe(lambda: indexes_of(tgt, name), {}))

        step("flush")
        src.flush(name)
        flushed = persisted_rows(ep["source_milvus"], db, name)
        self.findings["persisted_rows"] = flushed
        self.expect("persisted rows after flush", flushed, lambda: persisted_rows(ep["target_milvus"], db, name), 90)

        step("drop partition p2")
        src.drop_partition(name, "p2")
        self.expect("partitions after drop", sorted(src.list_partitions(name)),
                    lambda: sorted(tgt.list_partitions(name)))

        step("drop collection")
        src.drop_collection(name)
        self.expect("collection dropped", False, lambda: tgt.has_collection(name))

        for label, pause in (("back-to-back", False), ("while-paused", True)):
            self.create_and_drop_an_unnamed_index(src, tgt, f"{label.replace('-', '_')}_{tag}", label, pause)

        step("drop database")
        src_root.drop_database(db)
        self.expect("database dropped", False, lambda: db in tgt_root.list_databases())

        state, reason = self.task_state()
        self.expect("task state at the end", ("Running", ""), lambda: self.task_state(), 1)
        self.findings["task_state"] = [state, reason]

    def create_and_drop_an_unnamed_index(self, src, tgt, name: str, label: str, pause: bool) -> None:
        """An index made with no name and dropped before the CDC applies its CreateIndex: by then the source's
        catalog no longer lists it, so the name the replicate channel carries is all the CDC has."""
        from pymilvus import DataType, MilvusClient
        step(f"{label}: create an index with no name, drop it at once" + (" (task paused meanwhile)" if pause else ""))
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=4)
        src.create_collection(name, schema=schema, shards_num=1)
        self.expect(f"{label}: collection created", True, lambda: tgt.has_collection(name))
        if pause:
            self.server.call("pause", task_id=self.task_id)
        params = src.prepare_index_params()
        params.add_index("v", index_type="FLAT", metric_type="L2")
        src.create_index(name, params)
        index_name = src.list_indexes(name)[0]
        src.drop_index(name, index_name)
        # A later change: once the target has it, it has the index operations too. The row matters: a partition
        # made while the task is paused and left empty never reaches the target (an engine issue of its own,
        # seen with any versions), and the partition would then be no barrier.
        src.create_partition(name, "after")
        src.insert(name, [{"id": 1, "v": [1.0] * 4}], partition_name="after")
        if pause:
            self.server.call("resume", task_id=self.task_id)
        self.expect(f"{label}: partitions", sorted(src.list_partitions(name)),
                    lambda: sorted(tgt.list_partitions(name)))
        self.expect(f"{label}: indexes after creating and dropping {index_name!r}", indexes_of(src, name),
                    lambda: indexes_of(tgt, name), 15)
        self.findings[f"{label}: target indexes after the source created and dropped {index_name!r}"] = \
            sorted(safe(lambda: indexes_of(tgt, name), {"error": 1}))
        src.drop_collection(name)
        self.expect(f"{label}: collection dropped", False, lambda: tgt.has_collection(name))

    def etcd_indexes(self, src, tgt, name: str) -> dict:
        ep = self.endpoints
        out = {}
        for side, c, root in (("source", src, ep["source_root_path"]), ("target", tgt, ep["target_root_path"])):
            try:
                collection_id = c.describe_collection(name)["collection_id"]
                out[side] = [{k: r[k] for k in ("key", "field_id", "index_name", "index_params", "deleted")}
                             for r in field_indexes_in_etcd(ep["etcd"], root, collection_id)]
            except Exception as exc:  # noqa: BLE001
                out[side] = f"error: {exc!r}"
        return out

    # -- afterwards: what the source wrote, what the CDC said -------------------------------------------------

    def probe_replicate_channel(self) -> None:
        try:
            ops = replicate_channel_ops(self.endpoints["kafka"])
            tag = self.findings.get("collection", "").rsplit("_", 1)[-1]
            ops = [op for op in ops if op["collection_name"].endswith(tag)]
        except Exception as exc:  # noqa: BLE001
            ops = f"error: {exc!r}"
        self.findings["replicate_channel_index_ops"] = ops

    def cdc_log_lines(self) -> list[str]:
        if self.server is None:
            return []
        lines = self.server.log_text().splitlines()
        wanted = [ln for ln in lines if "index" in ln.lower() or " WARNING " in ln or " ERROR " in ln
                  or "Traceback" in ln or "paus" in ln.lower()]
        return wanted[-60:]


# ---------------------------------------------------------------------------------------------------------

def make_rows(start: int, count: int) -> list[dict]:
    import random
    rng = random.Random(start)
    return [{"id": i, "b": i % 2 == 0, "i8": i % 127, "i16": i % 30000, "i32": i * 7, "i64": i * 1_000_003,
             "f": i / 4, "d": i / 3, "s": f"row-{i}", "j": {"n": i, "tags": [i % 3, "x"]},
             "v": [rng.random() for _ in range(8)], "extra": f"dyn-{i}"} for i in range(start, start + count)]


def persisted_rows(uri: str, db: str, name: str) -> int:
    """Rows in the collection's flushed segments (GetPersistentSegmentInfo), deletes not subtracted."""
    import grpc
    from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc
    with grpc.insecure_channel(uri.removeprefix("http://")) as channel:
        answer = milvus_pb2_grpc.MilvusServiceStub(channel).GetPersistentSegmentInfo(
            milvus_pb2.GetPersistentSegmentInfoRequest(dbName=db, collectionName=name), timeout=30)
    if answer.status.code or answer.status.error_code:
        raise RuntimeError(answer.status.reason)
    return sum(s.num_rows for s in answer.infos)


def safe(fn, default):
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return default


def short(value, limit: int = 400) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def step(what: str) -> None:
    print(f"  - {what}", flush=True)


def run_direction(source_version: str, target_version: str, out: Path, state_file: Path | None = None) -> Run:
    """One direction, start to stop; the returned Run holds the differences and findings."""
    import pymilvus  # noqa: F401 - its import configures its loggers: quiet them afterwards
    for logger in ("pymilvus", "pymilvus.milvus_client"):  # each poll of a missing copy would log an ERROR
        logging.getLogger(logger).setLevel(logging.CRITICAL)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(source_version, target_version, out)
    workdir = Path(tempfile.mkdtemp(prefix=f"mixed-{source_version}-{target_version}-",
                                    dir=state_file.parent if state_file else None))
    stack = stack_module.Stack(workdir, with_pulsar=False, source_version=source_version,
                               target_version=target_version)
    began = time.monotonic()
    try:
        try:
            run.endpoints = stack.up()
        except stack_module.StackError as exc:
            raise StackStartError(str(exc)) from exc
        if state_file is not None:
            state_file.write_text(json.dumps(stack.state(), indent=2))
        run.timings["stack_up"] = round(time.monotonic() - began, 1)
        cdc_dir = out / "cdc"
        shutil.rmtree(cdc_dir, ignore_errors=True)
        cdc_dir.mkdir(parents=True)
        scenario_began = time.monotonic()
        try:
            run.server = CdcServer(server_config(run.endpoints, cdc_dir), cdc_dir)
            run.server.start()
            try:
                run.task_id = run.server.create_task(run.endpoints["target_milvus"])
            except AssertionError as exc:
                raise RuntimeError(f"the task was not created: {exc}\n{run.server.log_text()[-1500:]}") from None
            run.scenario()
        except Exception as exc:  # noqa: BLE001 - a source call that failed is itself a result
            state, reason = run.task_state() if run.task_id else ("none", "no task")
            run.differences.append({"step": "scenario aborted", "source": f"{exc!r}",
                                    "target": traceback.format_exc()[-1500:], "task_state": state,
                                    "task_reason": reason})
            print(f"  ABORTED: {exc!r}", flush=True)
        run.timings["scenario"] = round(time.monotonic() - scenario_began, 1)
        run.probe_replicate_channel()
        run.findings["cdc_log"] = run.cdc_log_lines()
    finally:
        if run.server is not None:
            if run.task_id:
                safe(lambda: run.server.call("delete", task_id=run.task_id), None)
            run.server.stop()
        for log in (workdir / "logs").glob("*.log"):
            shutil.copyfile(log, out / log.name)
        stack.down()
        run.timings["total"] = round(time.monotonic() - began, 1)
        (out / "report.json").write_text(json.dumps({
            "direction": run.label, "ok": not run.differences, "differences": run.differences,
            "checks": run.checks, "findings": run.findings, "timings": run.timings}, indent=2, default=str))
    return run


def summary(run: Run) -> str:
    ok = sum(c["ok"] for c in run.checks)
    head = (f"RESULT {run.label}: {'OK' if not run.differences else 'DIFFERS'} ({ok}/{len(run.checks)} checks "
            f"equal; stack up {run.timings.get('stack_up')} s, scenario {run.timings.get('scenario')} s, "
            f"total {run.timings.get('total')} s; report {run.out / 'report.json'})")
    lines = [head]
    for d in run.differences:
        lines.append(f"    {d['step']}: source {short(d['source'], 300)} | target {short(d['target'], 300)}"
                     + (f" | task {d['task_state']}: {d['task_reason']}" if d.get("task_state") != "Running" else ""))
    return "\n".join(lines)


def findings_text(run: Run) -> str:
    f = run.findings
    lines = [(f"  index names: source {f.get('source_index_names')} (the unnamed index of v is "
              f"{f.get('source_name_of_the_unnamed_index')!r}); target after create "
              f"{f.get('target_index_names_after_create')}, after dropping it "
              f"{f.get('target_index_names_after_unnamed_drop')}, after both drops "
              f"{f.get('target_index_names_after_drops')}")]
    for when in ("etcd_after_create", "etcd_after_unnamed_drop"):
        for side, records in (f.get(when) or {}).items():
            names = records if isinstance(records, str) else \
                [f"{r['index_name']!r}(field {r['field_id']}{', deleted' if r['deleted'] else ''})" for r in records]
            lines.append(f"  {when} {side}: {names}")
    lines += [f"  {k}: {v}" for k, v in f.items() if "created and dropped" in k]
    ops = f.get("replicate_channel_index_ops")
    if isinstance(ops, list):
        for op in ops:
            lines.append(f"  replicate channel: {op['type']} {op['collection_name']} field={op['field_name']!r} "
                         f"index_name={op['index_name']!r} params={op.get('extra_params', '')}")
    else:
        lines.append(f"  replicate channel: {ops}")
    lines.append("  CDC log (index lines, warnings, errors):")
    lines += [f"    {ln[:300]}" for ln in f.get("cdc_log", [])[-25:]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--direction", action="append", metavar="SOURCE:TARGET",
                        help="versions, e.g. 2.3.2:2.3.5 (default: both directions of 2.3.2 and 2.3.5)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "milvus-cdc-mixed-versions",
                        help="where each direction's report.json and logs go")
    args = parser.parse_args(argv)
    directions = [tuple(d.split(":", 1)) for d in args.direction] if args.direction else list(DIRECTIONS)
    state_file = stack_module.STATE_FILE
    if state_file.exists():
        print(f"a stack is already up (see {state_file}); stop it with `python tests/stack.py down` or set "
              "MILVUS_CDC_STACK_STATE to another file", file=sys.stderr)
        return 2
    state_file.parent.mkdir(parents=True, exist_ok=True)

    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)

    runs, failed_start = [], False
    for source_version, target_version in directions:
        print(f"== {source_version} -> {target_version}", flush=True)
        try:
            run = run_direction(source_version, target_version,
                                args.out / f"{source_version}-to-{target_version}", state_file)
        except StackStartError as exc:
            print(f"RESULT {source_version} -> {target_version}: STACK DID NOT START\n{exc}", flush=True)
            failed_start = True
            continue
        runs.append(run)
        print(findings_text(run), flush=True)
        print(summary(run), flush=True)
    print()
    for run in runs:
        print(summary(run).splitlines()[0])
    if failed_start:
        return 2
    return 1 if any(r.differences for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
