"""Retention and thinning of recovery points (pure).

Points younger than the *dense window* are all kept; older ones are thinned to
one per bucket of the dense window's width (the newest of the bucket, an
app-consistent one preferred); points older than the retention window are
dropped. The newest point is always kept: it is the base of the next cycle.
With the default 24 h retention this keeps every point of the last hour and
one per hour before that.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from siterecovery.domain.model import PointType, RecoveryPoint

DENSE_WINDOW_MAX = 3600.0


def dense_window(retention: float) -> float:
    """Seconds during which every point is kept."""
    return min(DENSE_WINDOW_MAX, retention / 4)


def points_to_drop(
    points: Sequence[RecoveryPoint], *, now: datetime, retention: float
) -> list[RecoveryPoint]:
    """The points retention removes, oldest first. ``points`` is ordered by seq."""
    if len(points) <= 1:
        return []
    dense = dense_window(retention)
    keep: dict[int, RecoveryPoint] = {}
    drop: list[RecoveryPoint] = []
    for point in points[:-1]:
        age = (now - point.time).total_seconds()
        if age <= dense:
            continue
        if age > retention:
            drop.append(point)
            continue
        bucket = int(age // dense)
        previous = keep.get(bucket)
        if previous is None:
            keep[bucket] = point
        elif _better(point, previous):
            drop.append(previous)
            keep[bucket] = point
        else:
            drop.append(point)
    return sorted(drop, key=lambda p: p.seq)


def _better(candidate: RecoveryPoint, current: RecoveryPoint) -> bool:
    app = PointType.APP_CONSISTENT
    if (candidate.type is app) != (current.type is app):
        return candidate.type is app
    return candidate.seq > current.seq
