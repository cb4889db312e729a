"""`gptkit monitor`: (being written)."""

from __future__ import annotations

import argparse


def add_monitor_parser(sub: argparse._SubParsersAction) -> None:
    del sub
