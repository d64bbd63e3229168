"""A session's checkpoints as deltas, with a keyframe every KEYFRAME_EVERY checkpoints.

A step's checkpoint stores only the messages the step added, and the number of
the checkpoint it extends (``base``) and of the keyframe its chain starts from
(``keyframe``): ``{"base": B, "keyframe": K, "messages": [...]}``. A keyframe
stores the whole history, ``{"messages": [...]}`` (every checkpoint written
before deltas existed is one). The history as of checkpoint N is the keyframe's
messages followed by each later checkpoint's, up to N: at most KEYFRAME_EVERY
rows, whatever the session's length. So a step writes what it added (plus, once
in KEYFRAME_EVERY steps, the whole history), not the whole history every time:
storage grows with the history, not with its square over the steps.

Pruning old checkpoints keeps every row from the keyframe of the oldest kept one
(:func:`prune_floor`), so each kept checkpoint can still be read whole.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Checkpoint

KEYFRAME_EVERY = 32


def keyframe_of(number: int, state: dict[str, Any]) -> int:
    """The keyframe a checkpoint's chain starts from (its own number if it is one)."""
    keyframe = state.get("keyframe")
    return int(keyframe) if keyframe is not None else number


def latest(db: Session, session_id: str) -> tuple[int, int] | None:
    """(number, keyframe) of the session's latest checkpoint, without reading its messages; None if none."""
    row = db.execute(
        select(Checkpoint.number, Checkpoint.state["keyframe"].as_integer())
        .where(Checkpoint.session_id == session_id).order_by(Checkpoint.number.desc()).limit(1)
    ).first()
    if row is None:
        return None
    number, keyframe = row
    return number, keyframe if keyframe is not None else number


def next_state(previous: tuple[int, int] | None, history: list[Any], added: list[Any]) -> dict[str, Any]:
    """The state of the checkpoint after ``previous`` (its number and keyframe), whose whole history is
    ``history`` followed by ``added``: a delta, or a keyframe when the chain is long enough."""
    if previous is None:
        return {"messages": history + added}
    number, keyframe = previous
    if number + 1 - keyframe >= KEYFRAME_EVERY:
        return {"messages": history + added}
    return {"base": number, "keyframe": keyframe, "messages": added}


def messages(db: Session, checkpoint: Checkpoint) -> list[Any]:
    """The whole history as of ``checkpoint``: its keyframe's messages and every later delta's, in order."""
    keyframe = keyframe_of(checkpoint.number, checkpoint.state)
    if keyframe == checkpoint.number:
        return list(checkpoint.state["messages"])
    chain = db.scalars(
        select(Checkpoint).where(Checkpoint.session_id == checkpoint.session_id,
                                 Checkpoint.number >= keyframe, Checkpoint.number < checkpoint.number)
        .order_by(Checkpoint.number)
    ).all()
    out: list[Any] = []
    expected = keyframe
    for row in [*chain, checkpoint]:
        if row.number != expected or (row.number != keyframe and row.state.get("base") != expected - 1):
            raise RuntimeError(f"checkpoint chain of session {checkpoint.session_id} is broken at {expected}")
        out.extend(row.state["messages"])
        expected = row.number + 1
    return out


def prune_floor(db: Session, session_id: str, cutoff: int) -> int:
    """The lowest checkpoint number that must be kept when keeping those above ``cutoff``: the keyframe of
    the oldest kept one (rows below it may go)."""
    row = db.execute(
        select(Checkpoint.number, Checkpoint.state["keyframe"].as_integer())
        .where(Checkpoint.session_id == session_id, Checkpoint.number > cutoff)
        .order_by(Checkpoint.number).limit(1)
    ).first()
    if row is None:
        return cutoff + 1
    number, keyframe = row
    return min(number, keyframe) if keyframe is not None else number
