"""The checkpointed learner (service.pipeline.learning) that every path that learns shares: a
checkpoint is continued only by a learner of the arguments it was trained with."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from learners.cb import CBTrainer
from learners.policy import header_options, with_exploration
from service.core.joined import joined_message
from service.storage import kafka, store
from service.storage.models import ModelCheckpoint
from tests.support.harness import Harness
from tests.support.pipeline import learn_to, pipeline
from tests.support.records import dsjson
from tests.support.services import Broker

# A policy the loops below do not have (theirs is dloop's default, SquareCB).
OTHER = "--cb_explore_adf --epsilon 0.3 -q ::"
LINE = dsjson([{"time": "noon"}])


def other_model(examples: int) -> bytes:
    trainer = CBTrainer(OTHER)
    for _ in range(examples):
        trainer.learn_text(LINE)
    assert trainer.examples == examples
    return trainer.to_bytes()


def save_other(sessions: sessionmaker[Session], *, position: int, now: float) -> None:
    """Store a checkpoint of 5 examples trained with OTHER (as a process that died before a
    policy change reset its model could have left it)."""
    with sessions.begin() as session:
        store.save_checkpoint(
            session,
            loop="default",
            model_id="other",
            model=other_model(5),
            arguments=OTHER,
            position=position,
            examples=5,
            now=now,
        )


def assert_restarted_blank(ckpt: ModelCheckpoint | None, arguments: str, learned: int) -> None:
    """The checkpoint holds a model of `arguments` that learned only the `learned` rows past
    the old checkpoint's position: the old model was not continued."""
    assert ckpt is not None and ckpt.model is not None
    assert ckpt.model_id != "other"
    assert ckpt.arguments == arguments
    assert ckpt.examples == learned  # not 5 + learned
    options = header_options(ckpt.model)
    assert "--squarecb" in options and "--epsilon" not in options, options


@pytest.mark.slow
def test_the_stream_learner_does_not_continue_a_model_of_other_arguments(
    postgres_url: str, kafka_broker: Broker
) -> None:
    """`dloop learn` loads a checkpoint the way the embedded learner does: one trained with
    other arguments than the loop's policy is not continued (VW would keep the arguments stored
    in the model while the checkpoint claimed the policy's); a blank model of the policy's
    arguments learns from the checkpoint's position and replaces it."""
    settings, engine, sessions = pipeline(postgres_url, kafka_broker, partitions=1)
    with sessions.begin() as session:
        loop = store.ensure_loop(session, name="default", kind="cb", now=time.time())
        loop_settings = store.loop_settings(loop)
        arguments = with_exploration(loop.policy["arguments"], loop_settings.exploration)
    save_other(sessions, position=2, now=time.time())
    producer = kafka.producer(settings)
    rows = [(pos, True, LINE) for pos in range(1, 7)]
    messages = [(b"default", joined_message(rows[i : i + 3])) for i in range(0, 6, 3)]
    kafka.send_all(producer, kafka.joined_topic(settings), messages, timeout=10)
    producer.close()
    learn_to(settings, sessions, position=6, what="the learner did not reach the end of the stream")
    with sessions() as session:
        ckpt = session.get(ModelCheckpoint, "default")
    assert_restarted_blank(ckpt, arguments, learned=4)  # positions 3 to 6
    engine.dispose()


def rank_and_reward(harness: Harness, event_ids: list[str]) -> None:
    body: dict[str, Any] = {
        "contextFeatures": [{"time": "noon"}],
        "actions": [{"id": a, "features": [{"a": a}]} for a in ("x", "y")],
    }
    for event_id in event_ids:
        harness.rank({**body, "eventId": event_id})
        harness.reward(event_id, 1.0)
    harness.clock.advance(2)
    harness.work()


def test_the_embedded_learner_does_not_continue_a_model_of_other_arguments(
    harness: Harness,
) -> None:
    """The reference behaviour the stream learner mirrors."""
    harness.configure(modelExportFrequency="PT1S")
    rank_and_reward(harness, ["a1", "a2"])
    worker = harness.dloop.worker
    assert worker is not None
    with harness.dloop.sessions() as session:
        ckpt = store.get_checkpoint(session, loop="default")
        assert ckpt is not None and ckpt.examples == 2
        position = ckpt.position
    save_other(harness.dloop.sessions, position=position, now=harness.clock())
    worker.learning.drop_all()  # as after a restart: every learner rebuilds from its checkpoint
    rank_and_reward(harness, ["b1", "b2", "b3"])
    with harness.dloop.sessions() as session:
        ckpt = store.get_checkpoint(session, loop="default")
    arguments = harness.dloop.registry.loops["default"].arguments
    assert_restarted_blank(ckpt, arguments, learned=3)
