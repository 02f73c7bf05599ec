"""Session fixtures: the real stack from tests/stack.py, started once, and helpers shared by the tests.

Set CDC_TEST_STACK to the JSON file `python tests/stack.py up` leaves behind
(/tmp/milvus-cdc-stack/current.json) to run the tests against an already running stack.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stack import Stack  # noqa: E402


@pytest.fixture(scope="session")
def stack() -> dict:
    reuse = os.environ.get("CDC_TEST_STACK")
    if reuse:
        state = json.loads(Path(reuse).read_text())
        yield {"pids": {p["name"]: p["pid"] for p in state["parts"]}, **state["endpoints"]}
        return
    running = Stack(Path(tempfile.mkdtemp(prefix="milvus-cdc-test-stack-")))
    try:
        yield running.up()
    finally:
        running.down()


@pytest.fixture
def unique_name():
    """A fresh name per call, so tests never share collections or databases."""
    def make(prefix: str = "t") -> str:
        return f"{prefix}_{uuid.uuid4().hex[:10]}"
    return make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that had a CDC server as a fixture shows that server's warnings and errors: what the task
    said is most often why the target did not get there."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    from helpers import CdcServer
    for name, value in getattr(item, "funcargs", {}).items():
        if isinstance(value, CdcServer):
            lines = [line for line in value.log_text().splitlines() if " WARNING " in line or " ERROR " in line]
            report.sections.append((f"CDC server {name}: warnings and errors (last 40 of {len(lines)})",
                                    "\n".join(lines[-40:]) or "(none)"))
            if value.alive():  # its tasks as get shows them: state, lag per channel, what they wait on
                try:
                    tasks = [value.task(t["task_id"]) for t in value.call("list")["tasks"]]
                except Exception as exc:  # noqa: BLE001 - a report must not fail
                    tasks = [f"(get failed: {exc})"]
                report.sections.append((f"CDC server {name}: its tasks", json.dumps(tasks, indent=1)[-6000:]))
