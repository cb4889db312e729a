"""`gptkit monitor`: classify a stream of dated texts into per-topic windows and raise alerts;
`gptkit monitor report`: draw a monitor database as one self-contained HTML page.

    gptkit monitor --model M --source posts.jsonl --db posts.db [--follow] [flags]
    gptkit monitor report --db posts.db --out report.html

The monitoring flags sit on `monitor` itself (the command people run most); `report` is its
one subcommand and takes only what it needs. Docs: docs/MONITOR.md.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from .cli_flags import checked_device, dtype_flag, quantize_flag
from .monitor_rules import MonitorError

REPORT_USAGE = "gptkit monitor report --db DB --out FILE"


def cmd_monitor(args: argparse.Namespace) -> None:
    from .monitor import MonitorConfig, open_store, run_monitor

    missing = [f"--{name}" for name in ("model", "source", "db") if getattr(args, name) is None]
    if missing:
        raise MonitorError(
            f"gptkit monitor needs {', '.join(missing)} (or, for a report: {REPORT_USAGE})"
        )
    config = MonitorConfig(
        source=args.source,
        db=args.db,
        follow=args.follow,
        poll=args.poll,
        batch_size=args.batch_size,
        text_field=args.text_field,
        time_field=args.time_field,
        id_field=args.id_field,
        topic_field=args.topic_field,
        sentiment_field=args.sentiment_field,
        negative=tuple(args.negative or ["negative"]),
        window=args.window,
        origin=args.origin,
        lateness=args.lateness,
        baseline=args.baseline,
        # the z-score is on unless a rule replaces it; --z with --rule keeps both
        z=args.z if args.z is not None else (None if args.rule else 3.0),
        rule=args.rule,
        alerts=args.alerts,
        webhook=args.webhook,
        webhook_timeout=args.webhook_timeout,
    )
    open_store(config).close()  # a bad flag or database fails here, before the model loads

    import torch

    from .api import load
    from .predict import label_function

    lm = load(args.model, device=checked_device(args), quantize=args.quantize)
    classify = label_function(lm, batch_size=args.batch_size, dtype=args.dtype)
    known = dict(lm.model.config.label_groups())  # {field: labels}, to check --negative

    stop = threading.Event()  # SIGTERM ends the run between batches, like Ctrl-C
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = torch.get_num_threads()
    if args.threads:
        # A monitor often shares its machine: on busy cores, torch's threads wait on each
        # other (a tiny model ran 60x slower with 2 threads than 1 on a loaded 2-core box).
        torch.set_num_threads(args.threads)
    try:
        result = run_monitor(config, classify, known_labels=known, stop=stop)
    finally:
        signal.signal(signal.SIGTERM, previous)
        torch.set_num_threads(threads)
    print(result.summary(config.source, config.db))


def cmd_report(args: argparse.Namespace) -> None:
    from .monitor_report import write_report

    report = write_report(args.db, args.out)
    print(
        f"wrote {report.path}: {report.topics} topics, {report.windows} windows, "
        f"{report.alerts} alerts ({report.bytes / 1e3:,.0f} kB)"
    )


def add_monitor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor",
        usage=f"gptkit monitor --model M --source PATH|- --db DB [options]\n       {REPORT_USAGE}",
        help="classify dated texts into per-topic windows, alert on negative surges (SQLite)",
        description="Read dated texts (a JSONL file, a folder of them, or - for stdin), label "
        "them with a classifier, count each topic's negative share per time window in a SQLite "
        "database, and alert when it rises beyond the topic's trailing baseline. A restart "
        "(even after a kill) resumes where the last run stopped. `gptkit monitor report` "
        "draws the database as an HTML page. See docs/MONITOR.md.",
    )
    p.add_argument("--model", help="a classifier from `gptkit finetune classify`")
    p.add_argument("--source", help="a JSONL file, a folder of *.jsonl files, or - (stdin)")
    p.add_argument("--db", help="the SQLite database (created when missing)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's)")
    quantize_flag(p, classifier=True)
    dtype_flag(p)
    p.add_argument("--follow", action="store_true", help="keep reading what is appended")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between looks for more")
    p.add_argument("--batch-size", type=int, default=32, help="texts classified together")
    p.add_argument("--text-field", default="text")
    p.add_argument("--time-field", default="date", help="ISO date/datetime, or a year")
    p.add_argument("--id-field", default="id")
    p.add_argument(
        "--topic-field",
        default="topic",
        help="the item's topic, else the classifier's field of this name, else 'all'",
    )
    p.add_argument(
        "--sentiment-field", help="the classifier field to watch (default: sentiment, or its only)"
    )
    p.add_argument(
        "--negative",
        action="append",
        metavar="LABEL",
        help="a label counted as negative (repeatable; default: negative)",
    )
    p.add_argument("--window", default="1d", help="window length: 6h, 1d, 7d, 1mo, 1y, 4y, ...")
    p.add_argument("--origin", default="1970-01-01", help="where one window starts")
    p.add_argument(
        "--lateness", default="0", help="how long after a window ends its items may arrive"
    )
    p.add_argument("--baseline", type=int, default=8, help="past windows a z-score compares to")
    p.add_argument("--z", type=float, help="alert at this z-score (default 3, off with --rule)")
    p.add_argument("--rule", help="alert when this holds, e.g. 'negative>0.4 and n>=20'")
    p.add_argument("--alerts", help="the alerts JSONL file (default: DB.alerts.jsonl)")
    p.add_argument("--webhook", help="POST each alert as JSON to this URL")
    p.add_argument("--webhook-timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_monitor)

    commands = p.add_subparsers(title="subcommand", metavar="report")
    # prog named outright: argparse would build it from `monitor`'s two-line usage
    r = commands.add_parser(
        "report",
        prog="gptkit monitor report",
        help="an HTML page of a monitor database: trends, volumes, alerts",
    )
    r.add_argument("--db", required=True, help="the monitor's SQLite database")
    r.add_argument("--out", type=Path, required=True, metavar="FILE", help="the HTML file to write")
    r.set_defaults(func=cmd_report)
