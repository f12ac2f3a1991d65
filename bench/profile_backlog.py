"""Profile target: one ``Filer.run_pass`` over a backlog, for py-spy (issue 10).

    py-spy record -o flame.svg -- .venv/bin/python bench/profile_backlog.py 2000

Seeds the backlog of ``backlog.py`` into a fresh mailbox (not profiled: py-spy is started
with the whole process, so compare the ``run_pass`` subtree) and files it once.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

from backlog import emailsync_pass, make_backlog, seed
from corpus import Directory
from testbed import Testbed

from emailsync.telemetry.logs import configure_logging


def main() -> None:
    """Seed, then one pass; prints messages/s."""
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    directory = Directory.build(random.Random(1))  # noqa: S311 -- test data
    with Path(os.devnull).open("w", encoding="utf-8") as sink, Testbed(directory) as testbed:
        configure_logging("json", "info", stream=sink)
        mailbox = testbed.new_mailbox()
        seed(mailbox, make_backlog(count, directory, random.Random(2)))  # noqa: S311
        time.sleep(0.5)
        seconds, _, events, cpu = emailsync_pass(mailbox)
        print(
            f"{count} messages in {seconds:.2f} s: {count / seconds:.0f} msg/s, {events} events,"
            f" {1e6 * cpu / count:.0f} us of CPU a message"
        )


if __name__ == "__main__":
    main()
