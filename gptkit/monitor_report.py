"""`gptkit monitor report`: a monitor database as one self-contained HTML page.

Per topic, a plot of the negative share over the windows (with the baseline band each window
was judged against, and the alerts marked) above the volume of items per window; then every
alert as a table row with its example texts. The page needs nothing else: plots are PNGs
inlined as base64 (drawn on a bare Agg Figure, never pyplot; see plot.py), styles are inline,
and a Content-Security-Policy forbids scripts and any network fetch. Every text that comes
from the data (topics, example texts, rules) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .monitor_rules import MonitorError
from .monitor_store import connect

MAX_TOPICS = 24  # plots drawn: the topics with alerts first, then the busiest

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; }
table { border-collapse: collapse; width: 100%; font-size: 0.92em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35em 0.5em; text-align: left;
         vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; white-space: nowrap; }
td.examples { max-width: 420px; } td.examples p { margin: 0 0 0.4em; color: #444; }
section.topic img { max-width: 100%; border: 1px solid #eee; }
.muted { color: #777; }
"""


@dataclass(frozen=True)
class Report:
    path: Path
    topics: int  # topics drawn
    windows: int
    alerts: int
    bytes: int


def _load(db: str | Path) -> tuple[dict[str, str], list[dict], list[dict], dict[str, Any]]:
    conn = connect(db, read_only=True)
    try:
        meta = {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM meta")}
        windows = [dict(r) for r in conn.execute("SELECT * FROM windows ORDER BY window_start")]
        alerts = [dict(r) for r in conn.execute("SELECT * FROM alerts ORDER BY id")]
        stats = dict(
            conn.execute(
                "SELECT count(*) AS items, min(time) AS first, max(time) AS last FROM items"
            ).fetchone()
        )
    finally:
        conn.close()
    return meta, windows, alerts, stats


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _topic_plot(windows: list[dict], alerts: list[dict]) -> str:
    """A base64 PNG: negative share (top) and items (bottom) per window of one topic."""
    starts = [datetime.fromisoformat(w["window_start"]) for w in windows]
    ends = [datetime.fromisoformat(w["window_end"]) for w in windows]
    mids = [s + (e - s) / 2 for s, e in zip(starts, ends, strict=True)]
    shares = [w["negatives"] / w["n"] for w in windows]

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    share_ax, volume_ax = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    judged = [i for i, w in enumerate(windows) if w["baseline_mean"] is not None]
    if judged:  # the band each window was judged against: mean ± std of the windows before
        low = [windows[i]["baseline_mean"] - windows[i]["baseline_std"] for i in judged]
        high = [windows[i]["baseline_mean"] + windows[i]["baseline_std"] for i in judged]
        share_ax.fill_between(
            [mids[i] for i in judged], low, high, color="tab:blue", alpha=0.12, lw=0,
            label="baseline mean ± std",
        )  # fmt: skip
    share_ax.plot(mids, shares, "-o", color="tab:blue", ms=3, lw=1.2, label="negative share")
    still_open = [i for i, w in enumerate(windows) if not w["closed"]]
    if still_open:
        share_ax.plot(
            [mids[i] for i in still_open], [shares[i] for i in still_open], "o", mfc="white",
            color="tab:blue", ms=6, label="open window (not judged yet)",
        )  # fmt: skip
    alerted = {a["window_start"] for a in alerts}
    hits = [i for i, w in enumerate(windows) if w["window_start"] in alerted]
    if hits:
        share_ax.plot(
            [mids[i] for i in hits], [shares[i] for i in hits], "v", color="tab:red", ms=9,
            label="alert",
        )  # fmt: skip
    share_ax.set_ylim(0, 1.02)
    share_ax.set_ylabel("negative share")
    share_ax.legend(loc="upper left", fontsize=8, frameon=False)
    share_ax.grid(alpha=0.3)

    widths = [(e - s) * 0.9 for s, e in zip(starts, ends, strict=True)]
    colors = ["tab:red" if i in hits else "tab:gray" for i in range(len(windows))]
    volume_ax.bar(starts, [w["n"] for w in windows], width=widths, align="edge", color=colors)
    volume_ax.set_ylabel("items")
    volume_ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _when(iso: str | None) -> str:
    """An ISO time as the report shows it: midnight is left out (windows start at one)."""
    return html.escape((iso or "–").removesuffix("T00:00:00"))


def _number(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _alert_rows(alerts: list[dict]) -> str:
    rows = []
    for a in alerts:
        baseline = "–"
        if a["baseline_mean"] is not None:
            baseline = (
                f"{a['baseline_mean']:.1%} ± {a['baseline_std']:.1%} "
                f"({a['baseline_windows']} windows)"
            )
        examples = "".join(f"<p>{html.escape(t)}</p>" for t in json.loads(a["examples"]))
        reasons = "; ".join(json.loads(a["reasons"]))
        rows.append(
            f'<tr class="alert"><td>{html.escape(a["topic"])}</td>'
            f"<td>{_when(a['window_start'])} to {_when(a['window_end'])}</td>"
            f'<td class="num">{a["n"]:,}</td>'
            f'<td class="num">{a["negative_share"]:.1%}</td>'
            f'<td class="num">{html.escape(baseline)}</td>'
            f'<td class="num">{_number(a["z"], ".1f")}</td>'
            f"<td>{html.escape(reasons)}</td>"
            f'<td class="examples">{examples}</td></tr>'
        )
    return "\n".join(rows)


def render(db_name: str, meta: dict, windows: list[dict], alerts: list[dict], stats: dict) -> str:
    by_topic: dict[str, list[dict]] = defaultdict(list)
    for w in windows:
        by_topic[w["topic"]].append(w)
    alerts_by_topic: dict[str, list[dict]] = defaultdict(list)
    for a in alerts:
        alerts_by_topic[a["topic"]].append(a)
    order = sorted(
        by_topic,
        key=lambda t: (-len(alerts_by_topic[t]), -sum(w["n"] for w in by_topic[t]), t),
    )
    sections = []
    for topic in order[:MAX_TOPICS]:
        png = _topic_plot(by_topic[topic], alerts_by_topic[topic])
        name = html.escape(topic)
        sections.append(
            f'<section class="topic"><h3>{name}</h3><img alt="negative share and items per '
            f'window: {name}" src="data:image/png;base64,{png}"></section>'
        )
    if len(order) > MAX_TOPICS:
        sections.append(
            f'<p class="muted">{len(order) - MAX_TOPICS} quieter topics are not drawn.</p>'
        )
    e = html.escape
    span = f"from {_when(stats['first'])} to {_when(stats['last'])}"
    window = f"{e(meta.get('window', '?'))} windows from {_when(meta.get('origin'))}"
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    alert_table = (
        '<table id="alerts"><thead><tr><th>topic</th><th>window</th><th>n</th>'
        "<th>negative</th><th>baseline</th><th>z</th><th>why</th><th>examples</th></tr>"
        f"</thead><tbody>\n{_alert_rows(alerts)}\n</tbody></table>"
        if alerts
        else '<p class="muted" id="alerts">No alerts.</p>'
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>gptkit monitor: {e(db_name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>gptkit monitor: {e(db_name)}</h1>
<p>{stats["items"]:,} items {span}; {len(by_topic)} topics, {len(windows)} windows
({window}; sentiment field {e(meta.get("sentiment_field", "?"))}, negative labels
{e(", ".join(json.loads(meta.get("negative", "[]"))))}); {len(alerts)} alerts.
<span class="muted">Generated {generated}.</span></p>
<h2>Alerts</h2>
{alert_table}
<h2>Topics</h2>
{"".join(sections) or '<p class="muted">No items yet.</p>'}
</body></html>
"""


def write_report(db: str | Path, out: str | Path) -> Report:
    """Write the HTML report of monitor database `db` to `out` (atomically)."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise MonitorError(f"--out {out} must be an .html file")
    meta, windows, alerts, stats = _load(db)
    page = render(Path(db).name, meta, windows, alerts, stats)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)  # a reader never sees half a page
    topics = len({w["topic"] for w in windows})
    return Report(out, min(topics, MAX_TOPICS), len(windows), len(alerts), len(page))
