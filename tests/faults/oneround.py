"""The restart after a fault, stopped right after its first decision round.

``python -m tests.faults.oneround CONFIG LOGFILE`` builds the real daemon (the same
:class:`vacfactory.daemon.Daemon` that ``vacfactory run`` builds: state lock, engine start-up
from disk, responder, metadata server, background jobs), runs exactly one engine round and
the daemon's after-round work, prints what the round did as one JSON line, and exits with
``os._exit`` - as if killed right then, without the final accounting flush of a clean stop.
The fault suite checks its invariants on exactly the state that one round left, which is
what "recovery within one decision round" claims.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    config_path, log_path = sys.argv[1], sys.argv[2]
    began = time.time()
    from vacfactory.config.loader import ConfigSources
    from vacfactory.daemon import Daemon, configure_logging

    configure_logging("INFO", log_path)
    out = {"pid": os.getpid(), "began": began}
    try:
        daemon = Daemon(ConfigSources.for_main_file(config_path))
        daemon.start()
        out["engine_started"] = time.time()
        report = daemon.factory.run_round()
        daemon._after_round()
        out.update(
            round_time=report.time, round_end=time.time(), blind=report.blind,
            adopted=report.adopted, finished=report.finished, killed=report.killed,
            zombies=report.zombies, created=report.created, failed=report.failed,
        )
    except Exception as error:  # noqa: BLE001 - reported to the test, which fails the trial
        import traceback

        out["error"] = f"{type(error).__name__}: {error}"
        out["traceback"] = traceback.format_exc()
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
