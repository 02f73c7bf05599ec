"""Random sequences of every replicated operation on the source, compared in full with the target afterwards (the
state machine and the comparison live in fuzz_replication.py).

Bounded for the suite: CDC_FUZZ_SEQUENCES (default 8) sequences of CDC_FUZZ_STEPS (default 20) steps, seed
CDC_FUZZ_SEED (default random, printed in the failure), at most CDC_FUZZ_SHRINK_SECONDS (default 120) spent
shrinking a failure. Each sequence runs under a task of CDC_FUZZ_MODE (default mixed: in turn a ``*`` task, a
db_collections task scoped to one of the sequence's databases, and a ``*`` task with a name_mapping; or star,
scoped, mapped alone). Between the source operations the task's lifecycle is disrupted, never waiting for the
target: the rules pause_resume (POST /cdc pause then resume), kill_restart (kill -9 the CDC server, start it again
on its config and meta store) and stop_restart (SIGTERM, start) act when drawn with probability
CDC_FUZZ_LIFECYCLE (default 0.4; 0 leaves them out), and CDC_FUZZ_LIFECYCLE_EVERY=N (default 0: off) forces one
after N steps in a row without one. CDC_FUZZ_SKIP leaves rules out; CDC_FUZZ_KEEP_GOING=1 records every failing
sequence and goes on instead of shrinking the first; CDC_FUZZ_OWN_TARGET=1 replicates into a target Milvus started
for the run (for a stack other tests use at the same time); CDC_FUZZ_ENGINE runs another copy of milvus_cdc.py.
"""
from __future__ import annotations

import os

import pytest

from fuzz_replication import DEFAULT_LIFECYCLE_RATE, own_target, run_fuzz, skipped_rules


def env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else default


@pytest.mark.slow
def test_random_operation_sequences_replicate(stack, tmp_path):
    with own_target(stack, bool(os.environ.get("CDC_FUZZ_OWN_TARGET"))) as endpoints:
        result = fuzz(endpoints, tmp_path)
    print(result.summary())  # the modes run, shown with -s or -rP
    if not result.ok:
        pytest.fail(f"{result.report()}\n(CDC log: {tmp_path / 'server.log'})", pytrace=False)


def fuzz(endpoints: dict, tmp_path):
    return run_fuzz(endpoints, tmp_path, sequences=env_int("CDC_FUZZ_SEQUENCES", 8),
                    steps=env_int("CDC_FUZZ_STEPS", 20), seed=env_int("CDC_FUZZ_SEED", None),
                    shrink_seconds=env_int("CDC_FUZZ_SHRINK_SECONDS", 120),
                    skip=skipped_rules(os.environ.get("CDC_FUZZ_SKIP")),
                    mode=os.environ.get("CDC_FUZZ_MODE") or "mixed",
                    lifecycle_rate=float(os.environ.get("CDC_FUZZ_LIFECYCLE") or DEFAULT_LIFECYCLE_RATE),
                    lifecycle_every=env_int("CDC_FUZZ_LIFECYCLE_EVERY", 0),
                    keep_going=bool(os.environ.get("CDC_FUZZ_KEEP_GOING")))
