"""``qtrain train`` that stops dead at a chosen point, for the SIGKILL tests.

Usage: ``python killable_train.py POINT READY_FILE -- train ARGS...``

POINT is ``step:N`` — inside step N (0-based, as recipe hooks count: after its forward and
backward, before its optimizer update) — or ``commit:N`` — inside this process's N-th
checkpoint commit, after the manifest names the new file and before the file is renamed into
place. There the process creates READY_FILE and waits to be killed; everything else is the
real command line (``qtrain.cli.main``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from qtrain import cli
from qtrain.recipes import RECIPES


def hold(ready: Path) -> None:
    ready.touch()
    while True:
        time.sleep(60)


def hold_in_step(recipe_name: str, step: int, ready: Path) -> None:
    base = RECIPES[recipe_name]

    class Holding(base):  # type: ignore[valid-type, misc]
        def before_optimizer_step(self, at: int, model: Any, optimizer: Any) -> None:
            if at == step:
                hold(ready)
            super().before_optimizer_step(at, model, optimizer)

    RECIPES[recipe_name] = Holding


def hold_in_commit(commit: int, ready: Path) -> None:
    replace = os.replace
    commits = 0

    def replace_holding(src: Any, dst: Any) -> None:
        nonlocal commits
        if Path(dst).name == "checkpoint.pt":
            commits += 1
            if commits == commit:
                hold(ready)
        replace(src, dst)

    os.replace = replace_holding


def main() -> int:
    point, ready, separator, *args = sys.argv[1:]
    assert separator == "--", __doc__
    kind, _, number = point.partition(":")
    if kind == "step":
        hold_in_step(args[args.index("--recipe") + 1], int(number), Path(ready))
    else:
        hold_in_commit(int(number), Path(ready))
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
