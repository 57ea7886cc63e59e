"""Charts as inline SVG, drawn on the server: no JavaScript, no CDN, nothing fetched.

Shapes carry CSS classes (``kc-*``, styled in ``keyaos/dashboard.css``) that use the admin's
colour variables, so a chart follows the light and dark themes. Every chart has a ``<title>``, an
``aria-label`` and a table of its numbers for readers that do not see the picture.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

SERIES_COUNT = 8
_ids = itertools.count(1)

Number = Decimal | int


@dataclass(frozen=True)
class LegendItem:
    label: str
    css_class: str


@dataclass(frozen=True)
class Chart:
    title: str
    svg: SafeString
    headers: list[str]
    rows: list[list[str]]
    legend: list[LegendItem] = field(default_factory=list)
    empty_text: str = ""

    @property
    def is_empty(self) -> bool:
        return not self.rows


def series_class(index: int) -> str:
    return f"kc-s{index % SERIES_COUNT}"


def nice_ceiling(value: Number) -> Decimal:
    """The smallest of 1, 2, 4, 6, 8 x 10^n that is >= value: a top whose quarters are round."""
    value = Decimal(value)
    if value <= 0:
        return Decimal(1)
    magnitude = Decimal(10) ** (value.adjusted())
    for step in (1, 2, 4, 6, 8):
        if value <= magnitude * step:
            return magnitude * step
    return magnitude * 10


def compact_number(value: Number) -> str:
    """12345 -> 12.3k; 2500000 -> 2.5M; small numbers as they are."""
    value = Decimal(value)
    for limit, suffix in ((Decimal(10**9), "G"), (Decimal(10**6), "M"), (Decimal(10**3), "k")):
        if abs(value) >= limit:
            return f"{(value / limit).quantize(Decimal('0.1')).normalize():f}{suffix}"
    if value == value.to_integral_value():
        return f"{value.to_integral_value():f}"
    return f"{value.normalize():f}"


def _open_svg(title: str, width: int, height: int, description: str) -> tuple[str, str]:
    chart_id = f"kc-{next(_ids)}"
    head = format_html(
        '<svg class="kc-chart" viewBox="0 0 {} {}" role="img" aria-label="{}" '
        'aria-labelledby="{}-title {}-desc" xmlns="http://www.w3.org/2000/svg" '
        'preserveAspectRatio="xMinYMin meet"><title id="{}-title">{}</title>'
        '<desc id="{}-desc">{}</desc>',
        width,
        height,
        title,
        chart_id,
        chart_id,
        chart_id,
        title,
        chart_id,
        description,
    )
    return head, chart_id


def _y_axis(
    top: Decimal, x0: float, x1: float, y0: float, height: float, fmt: Callable[[Decimal], str]
) -> list[str]:
    parts = []
    for step in range(5):
        value = top * step / 4
        y = y0 + height - height * step / 4
        parts.append(
            format_html(
                '<line class="kc-grid" x1="{}" x2="{}" y1="{}" y2="{}"/>'
                '<text class="kc-label" x="{}" y="{}" text-anchor="end">{}</text>',
                x0,
                x1,
                f"{y:.1f}",
                f"{y:.1f}",
                x0 - 6,
                f"{y + 4:.1f}",
                fmt(value),
            )
        )
    return parts


def stacked_bar_chart(
    *,
    title: str,
    days: Sequence[date],
    series: dict[str, Sequence[Decimal]],
    fmt: Callable[[Decimal], str],
    empty_text: str = "Nothing yet.",
) -> Chart:
    """One bar per day, one coloured segment per series (a provider), stacked."""
    width, height = 720, 240
    left, right, top_pad, bottom = 64, 8, 10, 26
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    totals = [sum((values[i] for values in series.values()), Decimal(0)) for i in range(len(days))]
    top = nice_ceiling(max(totals, default=Decimal(0)))
    names = list(series)
    head, _ = _open_svg(title, width, height, f"{len(days)} days, {len(names)} series")
    parts = [head, *_y_axis(top, left, width - right, top_pad, plot_h, fmt)]
    slot = plot_w / max(len(days), 1)
    bar_w = max(slot * 0.72, 1)
    for index, day in enumerate(days):
        x = left + slot * index + (slot - bar_w) / 2
        base = Decimal(0)
        for number, name in enumerate(names):
            value = series[name][index]
            if value <= 0:
                continue
            y_top = top_pad + plot_h - float((base + value) / top) * plot_h
            seg_h = float(value / top) * plot_h
            parts.append(
                format_html(
                    '<rect class="kc-bar {}" x="{}" y="{}" width="{}" height="{}">'
                    "<title>{} {}: {}</title></rect>",
                    series_class(number),
                    f"{x:.1f}",
                    f"{y_top:.1f}",
                    f"{bar_w:.1f}",
                    f"{max(seg_h, 0.5):.1f}",
                    name,
                    day.isoformat(),
                    fmt(value),
                )
            )
            base += value
        if index % 7 == (len(days) - 1) % 7:
            parts.append(
                format_html(
                    '<text class="kc-label" x="{}" y="{}" text-anchor="middle">{}</text>',
                    f"{x + bar_w / 2:.1f}",
                    height - 8,
                    day.strftime("%b %d"),
                )
            )
    parts.append(
        format_html(
            '<line class="kc-axis" x1="{}" x2="{}" y1="{}" y2="{}"/>',
            left,
            width - right,
            top_pad + plot_h,
            top_pad + plot_h,
        )
    )
    parts.append("</svg>")
    rows = [
        [day.isoformat(), *(fmt(series[name][i]) for name in names), fmt(totals[i])]
        for i, day in enumerate(days)
        if totals[i]
    ]
    return Chart(
        title=title,
        svg=mark_safe("".join(parts)),
        headers=["Day", *names, "Total"],
        rows=rows,
        legend=[LegendItem(name, series_class(i)) for i, name in enumerate(names)],
        empty_text=empty_text,
    )


@dataclass(frozen=True)
class BarRow:
    label: str
    values: tuple[Number, ...]
    note: str = ""
    link: str = ""


def horizontal_bar_chart(
    *,
    title: str,
    rows: Sequence[BarRow],
    columns: Sequence[str],
    fmts: Sequence[Callable[[Number], str]],
    empty_text: str = "Nothing yet.",
) -> Chart:
    """One line per row, and one bar panel per column (each panel with its own scale)."""
    label_w, panel_w, row_h, pad = 220, 240, 26, 20
    panels = len(columns)
    width = label_w + panels * (panel_w + pad)
    height = max(len(rows), 1) * row_h + 24
    head, _ = _open_svg(title, width, height, f"{len(rows)} rows: {', '.join(columns)}")
    parts = [head]
    tops = [
        max((Decimal(row.values[p]) for row in rows), default=Decimal(0)) for p in range(panels)
    ]
    for p, column in enumerate(columns):
        parts.append(
            format_html(
                '<text class="kc-label kc-head" x="{}" y="14">{}</text>',
                label_w + p * (panel_w + pad),
                column,
            )
        )
    for index, row in enumerate(rows):
        y = 24 + index * row_h
        label = row.label if len(row.label) <= 32 else row.label[:31] + "…"
        parts.append(
            format_html(
                '<text class="kc-text" x="{}" y="{}" text-anchor="end">{}<title>{}</title></text>',
                label_w - 8,
                y + row_h / 2 + 4,
                label,
                row.label,
            )
        )
        for p in range(panels):
            value = Decimal(row.values[p])
            x = label_w + p * (panel_w + pad)
            bar = float(value / tops[p]) * (panel_w - 70) if tops[p] else 0
            parts.append(
                format_html(
                    '<rect class="kc-bar {}" x="{}" y="{}" width="{}" height="{}">'
                    "<title>{}: {} {}</title></rect>"
                    '<text class="kc-label" x="{}" y="{}">{}</text>',
                    series_class(p),
                    x,
                    y + 5,
                    f"{max(bar, 1):.1f}",
                    row_h - 10,
                    row.label,
                    fmts[p](row.values[p]),
                    columns[p],
                    f"{x + max(bar, 1) + 5:.1f}",
                    y + row_h / 2 + 4,
                    fmts[p](row.values[p]),
                )
            )
    parts.append("</svg>")
    table = [[row.label, *(fmts[p](row.values[p]) for p in range(panels))] for row in rows]
    return Chart(
        title=title,
        svg=mark_safe("".join(parts)),
        headers=["", *columns],
        rows=table,
        empty_text=empty_text,
    )


@dataclass(frozen=True)
class RunwayRow:
    label: str
    balance_usd: Decimal
    balance_text: str
    runway_text: str
    warn: bool


def runway_chart(*, title: str, rows: Sequence[RunwayRow], empty_text: str) -> Chart:
    """Each key's balance as a bar (in USD, so keys in other currencies compare), runway beside."""
    label_w, bar_w, text_w, row_h = 220, 300, 300, 26
    width = label_w + bar_w + text_w
    height = max(len(rows), 1) * row_h + 8
    head, _ = _open_svg(title, width, height, f"{len(rows)} keys with a known balance")
    parts = [head]
    top = max((row.balance_usd for row in rows), default=Decimal(0))
    for index, row in enumerate(rows):
        y = 4 + index * row_h
        bar = float(row.balance_usd / top) * (bar_w - 10) if top > 0 else 0
        css = "kc-bar kc-warn" if row.warn else "kc-bar kc-s0"
        parts.append(
            format_html(
                '<text class="kc-text" x="{}" y="{}" text-anchor="end">{}</text>'
                '<rect class="kc-track" x="{}" y="{}" width="{}" height="{}"/>'
                '<rect class="{}" x="{}" y="{}" width="{}" height="{}">'
                "<title>{}: {}, {}</title></rect>"
                '<text class="{}" x="{}" y="{}">{} · {}</text>',
                label_w - 8,
                y + row_h / 2 + 4,
                row.label,
                label_w,
                y + 5,
                bar_w - 10,
                row_h - 10,
                css,
                label_w,
                y + 5,
                f"{max(bar, 1):.1f}",
                row_h - 10,
                row.label,
                row.balance_text,
                row.runway_text,
                "kc-text kc-warn-text" if row.warn else "kc-text",
                label_w + bar_w,
                y + row_h / 2 + 4,
                row.balance_text,
                row.runway_text,
            )
        )
    parts.append("</svg>")
    return Chart(
        title=title,
        svg=mark_safe("".join(parts)),
        headers=["Key", "Balance", "Runway"],
        rows=[[row.label, row.balance_text, row.runway_text] for row in rows],
        empty_text=empty_text,
    )


def step_line_chart(
    *,
    title: str,
    series: dict[str, Sequence[tuple[datetime, Decimal]]],
    end: datetime,
    fmt: Callable[[Decimal], str],
    empty_text: str,
) -> Chart:
    """Prices over time: each series holds its value until the next point (a price change)."""
    width, height = 720, 220
    left, right, top_pad, bottom = 72, 12, 10, 26
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    points = [point for values in series.values() for point in values]
    names = list(series)
    head, _ = _open_svg(title, width, height, f"{len(names)} offers, {len(points)} prices")
    parts = [head]
    if points:
        start = min(moment for moment, _ in points)
        span = max((end - start).total_seconds(), 1)
        top = nice_ceiling(max(value for _, value in points))
        parts += _y_axis(top, left, width - right, top_pad, plot_h, fmt)

        def x_of(moment: datetime) -> float:
            return left + (moment - start).total_seconds() / span * plot_w

        def y_of(value: Decimal) -> float:
            return top_pad + plot_h - float(value / top) * plot_h

        for number, name in enumerate(names):
            values = sorted(series[name])
            if not values:
                continue
            coords: list[str] = []
            for i, (moment, value) in enumerate(values):
                until = values[i + 1][0] if i + 1 < len(values) else end
                coords.append(f"{x_of(moment):.1f},{y_of(value):.1f}")
                coords.append(f"{x_of(until):.1f},{y_of(value):.1f}")
            parts.append(
                format_html(
                    '<polyline class="kc-line {}" points="{}"><title>{}</title></polyline>',
                    series_class(number),
                    " ".join(coords),
                    name,
                )
            )
            for moment, value in values:
                parts.append(
                    format_html(
                        '<circle class="kc-dot {}" cx="{}" cy="{}" r="3">'
                        "<title>{} {}: {}</title></circle>",
                        series_class(number),
                        f"{x_of(moment):.1f}",
                        f"{y_of(value):.1f}",
                        name,
                        moment.strftime("%Y-%m-%d %H:%M"),
                        fmt(value),
                    )
                )
        for moment, anchor in ((start, "start"), (end, "end")):
            parts.append(
                format_html(
                    '<text class="kc-label" x="{}" y="{}" text-anchor="{}">{}</text>',
                    f"{x_of(moment):.1f}",
                    height - 8,
                    anchor,
                    moment.strftime("%Y-%m-%d"),
                )
            )
    parts.append("</svg>")
    rows = sorted(
        (
            [moment.strftime("%Y-%m-%d %H:%M"), name, fmt(value)]
            for name in names
            for moment, value in series[name]
        ),
        reverse=True,
    )
    return Chart(
        title=title,
        svg=mark_safe("".join(parts)),
        headers=["Recorded", "Offer", "Price"],
        rows=rows,
        legend=[LegendItem(name, series_class(i)) for i, name in enumerate(names)],
        empty_text=empty_text,
    )
