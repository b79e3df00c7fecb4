"""Model checkpoints: each loop's model with how far into its joined stream it has learned."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from service.storage.models import ModelCheckpoint
from service.storage.store.joined import max_seq


def get_checkpoint(session: Session, *, loop: str) -> ModelCheckpoint | None:
    return session.get(ModelCheckpoint, loop)


def save_checkpoint(
    session: Session,
    *,
    loop: str,
    model_id: str,
    model: bytes | None,
    arguments: str,
    position: int,
    examples: int,
    now: float,
    reset: bool = False,
) -> None:
    row = session.get(ModelCheckpoint, loop)
    if row is None:
        row = ModelCheckpoint(loop=loop, created_at=now)
        session.add(row)
    if reset:
        row.created_at = now
    row.model_id = model_id
    row.model = model
    row.arguments = arguments
    row.position = position
    row.examples = examples
    row.modified_at = now


def reset_checkpoint(
    session: Session,
    *,
    loop: str,
    model: bytes | None,
    arguments: str,
    now: float,
    position: int | None = None,
) -> tuple[str, int]:
    """Replace a loop's model (None: blank) from the next event on; returns (model id, position
    it covers).

    Learners notice the new model id and rebuild from it. Embedded, the position is the loop's
    newest joined seq; the Kafka path passes its newest stream `position` instead."""
    # A fresh id even for a blank model, so every learner notices the reset.
    model_id = uuid.uuid4().hex[:16]
    ckpt = get_checkpoint(session, loop=loop)
    if position is not None:
        seq = position
    else:
        seq = max(max_seq(session, loop=loop), ckpt.position if ckpt else 0)
    save_checkpoint(
        session,
        loop=loop,
        model_id=model_id,
        model=model,
        arguments=arguments,
        position=seq,
        examples=0,
        now=now,
        reset=True,
    )
    return model_id, seq
