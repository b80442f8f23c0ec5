"""Retention keeps every recent point, one per bucket after that, nothing past the window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from siterecovery.domain.model import PointType, RecoveryPoint
from siterecovery.points.retention import points_to_drop

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def _points(ages_minutes: list[float], app: set[int] = frozenset()) -> list[RecoveryPoint]:  # type: ignore[assignment]
    return [
        RecoveryPoint(
            id=f"p{i}",
            vm="web01",
            site="cloud",
            seq=i + 1,
            time=NOW - timedelta(minutes=age),
            type=PointType.APP_CONSISTENT if i in app else PointType.CRASH_CONSISTENT,
            files={"d0": f"p{i + 1:06d}.qcow2"},
        )
        for i, age in enumerate(ages_minutes)
    ]


def test_recent_points_are_all_kept() -> None:
    points = _points([50, 40, 30, 20, 10, 0])
    assert points_to_drop(points, now=NOW, retention=24 * 3600) == []


def test_old_points_thinned_to_one_per_hour_preferring_app_consistent() -> None:
    points = _points([190, 180, 170, 130, 125, 0], app={4})
    dropped = {p.id for p in points_to_drop(points, now=NOW, retention=24 * 3600)}
    # bucket 3h: 190 and 180 -> keep the newer (180); bucket 2h: 170, 130, 125 -> keep app p4
    assert dropped == {"p0", "p2", "p3"}


def test_points_past_retention_dropped_but_never_the_newest() -> None:
    points = _points([30, 20, 11])
    assert [p.id for p in points_to_drop(points, now=NOW, retention=600)] == ["p0", "p1"]
    only = _points([999])
    assert points_to_drop(only, now=NOW, retention=600) == []
