"""Geometry for the console's inline SVG: a turn's trace as a waterfall, and the queue's last hour.

Pure functions from rows to shapes; the templates only draw them. Coordinates
are in a fixed viewBox, so the SVG scales to the page's width.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.clock import aware
from shared.fleet import LatencyBucket
from shared.models import QueueSample, TraceSpan

WIDTH = 1000
LABEL_W = 250  # the label column of the waterfall
ROW_H = 24


@dataclass(frozen=True)
class Bar:
    y: float
    x: float
    width: float
    kind: str
    status: str
    label: str
    detail: str
    depth: int
    # Where the detail text goes: right of the bar if it fits, else left of it.
    detail_x: float
    detail_anchor: str


@dataclass(frozen=True)
class Waterfall:
    bars: list[Bar]
    height: float
    ticks: list[tuple[float, str]]
    total_ms: float


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.1f} ms"


def _detail(span: TraceSpan) -> str:
    a = span.attributes or {}
    parts = [_ms(span.duration_ms)]
    if span.kind == "model":
        parts.append(f"{a.get('input_tokens') or 0} in / {a.get('output_tokens') or 0} out tokens")
        if a.get("time_to_first_token_ms") is not None:
            parts.append(f"first token {_ms(a['time_to_first_token_ms'])}")
    elif span.kind == "step":
        if a.get("queue_latency_ms") is not None:
            parts.append(f"queued {_ms(a['queue_latency_ms'])}")
        if span.attempt > 1:
            parts.append(f"attempt {span.attempt}")
    if span.status != "ok":
        parts.append(span.status)
    return " · ".join(parts)


def waterfall(spans: list[TraceSpan]) -> Waterfall:
    """Each step, then its model and tool calls, on one time axis from the first start to the last end."""
    if not spans:
        return Waterfall([], ROW_H * 2, [], 0.0)
    start = min(aware(s.started_at) for s in spans)
    end = max(aware(s.started_at) + timedelta(milliseconds=s.duration_ms) for s in spans)
    total_ms = max((end - start).total_seconds() * 1000, 1.0)
    scale = (WIDTH - LABEL_W - 10) / total_ms
    steps = [s for s in spans if s.parent_span_id is None]
    children: dict[str, list[TraceSpan]] = {}
    for s in spans:
        if s.parent_span_id is not None:
            children.setdefault(s.parent_span_id, []).append(s)
    ordered: list[tuple[TraceSpan, int]] = []
    for step in steps:
        ordered.append((step, 0))
        ordered.extend((child, 1) for child in children.get(step.span_id, []))
    bars = []
    top = ROW_H  # room for the axis labels
    for i, (span, depth) in enumerate(ordered):
        offset = (aware(span.started_at) - start).total_seconds() * 1000
        x, width, detail = LABEL_W + offset * scale, max(2.0, span.duration_ms * scale), _detail(span)
        text_w = 6.2 * len(detail)  # about 11 px text
        right = x + width + 6 + text_w <= WIDTH
        bars.append(Bar(y=top + i * ROW_H, x=x, width=width, kind=span.kind, status=span.status,
                        label=f"{span.kind} {span.name}" if depth else span.name, detail=detail, depth=depth,
                        detail_x=x + width + 6 if right else max(LABEL_W + text_w, x - 6),
                        detail_anchor="start" if right else "end"))
    ticks = [(LABEL_W + (WIDTH - LABEL_W - 10) * f, _ms(total_ms * f)) for f in (0, 0.25, 0.5, 0.75, 1)]
    return Waterfall(bars, top + len(ordered) * ROW_H + 4, ticks, total_ms)


@dataclass(frozen=True)
class Series:
    name: str
    coords: list[tuple[float, float]]
    css: str

    @property
    def points(self) -> str:
        """The coordinates as an SVG polyline's ``points``."""
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in self.coords)


@dataclass(frozen=True)
class Chart:
    series: list[Series]
    y_max: float
    y_label: str
    x_ticks: list[tuple[float, str]]
    empty: bool


CHART_H = 160
PLOT_X0, PLOT_X1 = 60, WIDTH - 10


def _x(at: datetime, since: datetime, span_s: float) -> float:
    return PLOT_X0 + (PLOT_X1 - PLOT_X0) * max(0.0, min(1.0, (aware(at) - since).total_seconds() / span_s))


def _y(value: float, y_max: float) -> float:
    return 10 + (CHART_H - 30) * (1 - value / y_max)


def _ticks(since: datetime, span_s: float) -> list[tuple[float, str]]:
    minutes = span_s / 60
    return [(PLOT_X0 + (PLOT_X1 - PLOT_X0) * f, "now" if f == 1 else f"-{round(minutes * (1 - f))} min")
            for f in (0, 0.25, 0.5, 0.75, 1)]


def _nice(value: float) -> float:
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000):
        if value <= step:
            return float(step)
    return value


def depth_chart(rows: list[QueueSample], since: datetime, now: datetime) -> Chart:
    span_s = max((now - since).total_seconds(), 1.0)
    y_max = _nice(max([r.waiting for r in rows] + [r.running for r in rows] + [1]))
    series = [
        Series("waiting", [(_x(r.at, since, span_s), _y(r.waiting, y_max)) for r in rows], "waiting"),
        Series("running", [(_x(r.at, since, span_s), _y(r.running, y_max)) for r in rows], "running"),
    ]
    return Chart(series, y_max, "steps", _ticks(since, span_s), not rows)


def latency_chart(buckets: list[LatencyBucket], since: datetime, now: datetime, bucket_s: int) -> Chart:
    span_s = max((now - since).total_seconds(), 1.0)
    y_max = _nice(max([b.p99 for b in buckets] + [0.01]) * 1000) / 1000
    half = timedelta(seconds=bucket_s / 2)
    series = [
        Series("p50", [(_x(b.start + half, since, span_s), _y(b.p50, y_max)) for b in buckets], "p50"),
        Series("p99", [(_x(b.start + half, since, span_s), _y(b.p99, y_max)) for b in buckets], "p99"),
    ]
    return Chart(series, y_max, "seconds", _ticks(since, span_s), not buckets)
