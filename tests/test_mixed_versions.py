"""Replication between Milvus 2.3.2 and 2.3.5, both ways (tests/mixed_versions.py under pytest).

Each direction starts its own stack (two more Milvus servers, etcd, Tansu) and takes 1 to 2 minutes, so it
runs only when asked for:

    CDC_MIXED_VERSIONS=1 python -m pytest -m mixed tests/test_mixed_versions.py

Without CDC_MIXED_VERSIONS=1 both cases are skipped (the default suite, and .ci/run, start nothing for them).
Run it apart from the rest of the suite: the suite's own stack would share the 2 cores with it.
"""
from __future__ import annotations

import json
import os

import pytest

from mixed_versions import DIRECTIONS, findings_text, run_direction, summary

pytestmark = [
    pytest.mark.mixed,
    pytest.mark.skipif(os.environ.get("CDC_MIXED_VERSIONS") != "1",
                       reason="starts its own Milvus 2.3.2 and 2.3.5 stacks: set CDC_MIXED_VERSIONS=1"),
]


@pytest.mark.parametrize(("source_version", "target_version"), DIRECTIONS, ids=[f"{s}-to-{t}" for s, t in DIRECTIONS])
def test_replication_between_versions(tmp_path, source_version, target_version):
    run = run_direction(source_version, target_version, tmp_path / f"{source_version}-to-{target_version}")
    print(findings_text(run))
    assert not run.differences, summary(run) + "\n" + json.dumps(run.differences, indent=1, default=str)[:6000]
