"""Random sequences of every replicated operation on the source, compared in full with the target afterwards (the
state machine and the comparison live in fuzz_replication.py).

Bounded for the suite: CDC_FUZZ_SEQUENCES (default 20) sequences of CDC_FUZZ_STEPS (default 20) steps, seed
CDC_FUZZ_SEED (default random, printed in the failure), at most CDC_FUZZ_SHRINK_SECONDS (default 240) spent
shrinking a failure. Each sequence runs under a task of CDC_FUZZ_MODE (default mixed: in turn a ``*`` task, a
db_collections task scoped to one of the sequence's databases, and a ``*`` task with a name_mapping; or star,
scoped, mapped alone). CDC_FUZZ_SKIP leaves rules out; CDC_FUZZ_ENGINE runs another copy of
milvus_cdc.py.
"""
from __future__ import annotations

import os

import pytest

from fuzz_replication import run_fuzz, skipped_rules


def env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else default


@pytest.mark.slow
def test_random_operation_sequences_replicate(stack, tmp_path):
    result = run_fuzz(stack, tmp_path, sequences=env_int("CDC_FUZZ_SEQUENCES", 20),
                      steps=env_int("CDC_FUZZ_STEPS", 20), seed=env_int("CDC_FUZZ_SEED", None),
                      shrink_seconds=env_int("CDC_FUZZ_SHRINK_SECONDS", 240),
                      skip=skipped_rules(os.environ.get("CDC_FUZZ_SKIP")),
                      mode=os.environ.get("CDC_FUZZ_MODE") or "mixed")
    print(result.summary())  # the modes run, shown with -s or -rP
    if not result.ok:
        pytest.fail(f"{result.report()}\n(CDC log: {tmp_path / 'server.log'})", pytrace=False)
