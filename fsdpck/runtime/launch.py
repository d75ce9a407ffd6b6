"""``-n N``: fsdpck starts its own workers through PyTorch's elastic launcher and returns
their exact exit code.

torchrun exits 1 whenever any worker exits non-zero (measured with torch 2.13: workers
exiting 1, 2 or 3 all gave torchrun exit 1), so under torchrun a job script cannot tell a
difference from a crash. Here the launcher runs in-process (standalone rendezvous on
localhost with a free port, no restarts), the workers inherit stdout so rank 0's report
appears once, the launcher's own log lines are silenced, and the exit code is the most
severe fsdpck code across ranks (3 > 2 > 1 > 0).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid

from fsdpck.errors import EXIT_DIFFERENCE, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE

FSDPCK_CODES = (EXIT_DIFFERENCE, EXIT_USAGE, EXIT_RUNTIME)
# Set in the workers' environment: they run the very command line given to fsdpck, -n included,
# and -n then means nothing more to do for them.
WORKER_ENV = "FSDPCK_N_WORKER"


def is_worker() -> bool:
    """Whether this process is one of the workers that ``-n`` started."""
    return os.environ.get(WORKER_ENV) == "1"


def exit_code_from(worker_codes: list[int]) -> int:
    """Most severe fsdpck code across ranks; a rank ended by a signal alone counts as a runtime failure."""
    ours = [c for c in worker_codes if c in FSDPCK_CODES]
    if ours:
        return max(ours)
    if any(c != 0 for c in worker_codes):
        return EXIT_RUNTIME
    return EXIT_OK


def quiet_launcher_logs() -> None:
    """The launcher's log lines ("Sending process ... closing signal", the failure summary, its
    error-file reader's tracebacks) are not the user's business: fsdpck's workers say what
    happened. torch's get_logger gives each module's logger a level of its own, so every one is
    set, not only the parents."""
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher")
    for name in [*prefixes, *(n for n in list(logging.root.manager.loggerDict) if n.startswith(prefixes))]:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def run_workers(nproc: int, argv: list[str]) -> int:
    """Start ``nproc`` workers running ``python -m fsdpck <argv>`` (the command line as given, -n
    included), wait, and return the fsdpck exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    quiet_launcher_logs()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: N workers must not each take every core
    os.environ[WORKER_ENV] = "1"
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"fsdpck-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "fsdpck", *argv)
    except ChildFailedError as e:
        for rank, failure in sorted(e.failures.items()):
            # A rank killed by a signal (the OOM killer, a drill) says nothing itself: say it for it.
            # SIGTERM is the launcher ending the others once one rank failed.
            if failure.exitcode < 0 and failure.signal_name() not in ("SIGTERM", "SIGINT"):
                print(f"fsdpck: rank {rank} was ended by signal {failure.signal_name()}", file=sys.stderr, flush=True)
        return exit_code_from([f.exitcode for f in e.failures.values()])
    return EXIT_OK


def write_elastic_error_file(message: str) -> None:
    """Leave torchelastic a concise error record, so torchrun's failure summary shows fsdpck's
    verdict instead of ``error_file: <N/A>`` (the file ``@record`` would write for an exception)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # Written whole or not at all: a rank the launcher ends mid-write must not leave an empty file,
    # which the launcher cannot parse (it raised JSONDecodeError instead of the ranks' failure).
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
