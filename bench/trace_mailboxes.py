"""Where each mailbox's memory goes: a tracemalloc diff of ``emailsync run`` over N mailboxes.

    .venv/bin/python bench/trace_mailboxes.py [N]

The daemon runs under tracemalloc; one snapshot is taken just before the supervisor starts
its workers, the other once every mailbox is in IDLE. Prints the top allocation sites of
the difference (per mailbox) by line and by file.
"""

from __future__ import annotations

import random
import sys
import textwrap
import time
from pathlib import Path

from corpus import Directory
from daemonproc import DaemonProcess
from mailboxes import _config, inotify_instances, make_users, new_home
from testbed import Testbed

FRAMES = 1
_WRAPPER = textwrap.dedent(
    """
    import os, sys, threading, time, tracemalloc
    tracemalloc.start({frames})
    import emailsync.service.supervisor as sup
    out = sys.argv.pop(1)
    original = sup.Supervisor.run
    def run(self):
        before = tracemalloc.take_snapshot()
        def later():
            while not os.path.exists(out + ".go"):
                time.sleep(0.5)
            after = tracemalloc.take_snapshot()
            before.dump(out + ".before")
            after.dump(out + ".after")
            open(out + ".done", "w").close()
        threading.Thread(target=later, daemon=True).start()
        return original(self)
    sup.Supervisor.run = run
    from emailsync.cli import main
    sys.exit(main(sys.argv[1:]))
    """
).format(frames=FRAMES)


def main() -> int:
    """Run, snapshot, print the diff."""
    import tracemalloc  # noqa: PLC0415

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    with Testbed(Directory.build(random.Random(1))) as testbed, inotify_instances(2 * count + 512):  # noqa: S311
        users = make_users(testbed, count)
        home, port, config = new_home(testbed, users, "trace", _config)
        out = str(home / "snap")
        wrapper = home / "wrapper.py"
        wrapper.write_text(_WRAPPER, encoding="utf-8")
        daemon = DaemonProcess(config, port, home / "daemon.log")
        daemon.process.kill()
        daemon.process.wait()
        import subprocess  # noqa: PLC0415

        with (home / "daemon.log").open("wb") as log:
            daemon.process = subprocess.Popen(
                [sys.executable, str(wrapper), out, "--config", str(config), "run"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        with daemon:
            while True:
                idle = sum(
                    v
                    for (name, labels), v in daemon.metrics().items()
                    if name == "emailsync_mailbox_state" and ("state", "idle") in labels
                )
                if idle >= count:
                    break
                if daemon.process.poll() is not None:
                    raise RuntimeError(daemon.log_tail())
                time.sleep(3)  # tracemalloc slows the daemon: scrape seldom
            time.sleep(2)
            Path(out + ".go").touch()
            while not (home / "snap.done").exists():
                time.sleep(0.5)
        before = tracemalloc.Snapshot.load(out + ".before")
        after = tracemalloc.Snapshot.load(out + ".after")
    for key in ("lineno", "filename"):
        stats = after.compare_to(before, key)
        total = sum(s.size_diff for s in stats)
        print(f"\n== by {key}: {total / 1024 / count:.1f} KB traced per mailbox ==")
        for stat in stats[:25]:
            frame = stat.traceback[0]
            where = f"{frame.filename.split('site-packages/')[-1].split('/lib/python3')[-1]}"
            if key == "lineno":
                where += f":{frame.lineno}"
            print(
                f"{stat.size_diff / 1024 / count:8.2f} KB/mb"
                f" {stat.count_diff / count:7.1f} blocks/mb  {where}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
