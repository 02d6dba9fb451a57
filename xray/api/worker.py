"""The training worker: ``python -m xray.api.worker train --run-id ID ...`` (the ``xray`` CLI's arguments).

It waits for one ``start`` line on stdin before touching anything. The app
writes the queued manifest with this process's pid in between, so a run is
never left with no process answerable for it: if the app dies first, stdin
closes and the worker exits without starting, and the app's orphan check
marks the queued run failed.

Its output goes to ``worker.log`` in the run directory until the run is
sealed; after that it goes nowhere, since a sealed run is never written again
(the manifest already holds the status and the reason).
"""

from __future__ import annotations

import os
import sys

START = "start"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if sys.stdin.readline().strip() != START:
        sys.stderr.write("xray worker: no start signal from the app; exiting without starting the run\n")
        return 3
    from xray.cli import main as cli_main

    return cli_main(argv if argv is not None else sys.argv[1:], after_run=_detach_output)


def _detach_output() -> None:
    """Point stdout and stderr (the run's worker.log) at /dev/null, down to the file descriptors."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
