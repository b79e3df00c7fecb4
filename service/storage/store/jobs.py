"""Offline jobs' results: evaluations and feature importances."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.storage.models import (
    Evaluation,
    FeatureImportance,
)


def list_evaluations(session: Session, *, loop: str) -> Sequence[Evaluation]:
    stmt = select(Evaluation).where(Evaluation.loop == loop).order_by(Evaluation.created_at)
    return session.scalars(stmt).all()


def list_feature_importances(session: Session, *, loop: str) -> Sequence[FeatureImportance]:
    stmt = select(FeatureImportance).where(FeatureImportance.loop == loop)
    return session.scalars(stmt.order_by(FeatureImportance.created_at)).all()
