"""What every background thread shares (service.pipeline.background): the error taxonomy, and a
loop that waits out an outage, recovers before the next step, and stops on a bug."""

from __future__ import annotations

import logging
import threading

import kafka.errors as KafkaErrors
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError


def test_an_outage_is_waited_out_and_recovered_from_and_a_bug_stops_the_worker() -> None:
    from service.pipeline.background import is_transient, keep_running

    log = logging.getLogger("test")
    stop = threading.Event()
    calls: list[str] = []
    outages = [
        OperationalError("SELECT 1", {}, Exception("connection refused")),
        KafkaErrors.CommitFailedError(),
        KafkaErrors.KafkaTimeoutError(),
    ]

    def step() -> bool:
        calls.append("step")
        if outages:
            raise outages.pop(0)
        if calls.count("step") == 4:
            raise KeyError("a bug")
        return True

    def recover() -> None:
        calls.append("recover")
        if calls.count("recover") == 1:  # the database is still away: retried later
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    with pytest.raises(KeyError):
        keep_running(
            stop, step, what="t", logger=log, backoff=0.001, recover=recover, transient=is_transient
        )
    # every failed step is followed by a recovery before the next step; the bug is not retried
    assert calls == [
        "step",
        "recover",  # failed: the database is still away
        "recover",
        "step",
        "recover",
        "step",
        "recover",
        "step",  # the bug
    ]
    assert not is_transient(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not is_transient(ValueError())
