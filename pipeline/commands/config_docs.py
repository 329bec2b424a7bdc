"""`python -m pipeline config-docs`: print the config reference (docs/CONFIG.md)."""
from __future__ import annotations

import argparse
from typing import Any

from pipeline.config import config_reference

NAME = "config-docs"


def add_parser(commands: Any) -> None:
    commands.add_parser(NAME, help="print the config reference (Markdown)")


def run(args: argparse.Namespace) -> int:
    print(config_reference())
    return 0
