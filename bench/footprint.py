"""Peak RSS of ``emailsync sync`` (issue 10): a small vs a large backlog, a small vs a huge message.

Each figure is the peak RSS (VmHWM) of one ``emailsync sync`` process
filing a freshly seeded Queue, so the interpreter and its imports count in both figures of a
pair and the difference is what the mail costs.
"""

from __future__ import annotations

import random
import subprocess
import sys
from email.message import EmailMessage
from email.utils import make_msgid

from backlog import BacklogMessage, make_backlog, seed
from testbed import OWNER_ALIAS, BenchMailbox, Testbed

from emailsync.model import FolderRole, Outcome

# The peak is read inside the child (VmHWM, proc(5)): it belongs to the process image that
# ran emailsync. wait4's ru_maxrss would also count the bench's own pages, shared between
# fork and exec, and survives exec (execve(2)).
_CHILD = """
import sys
from pathlib import Path
from emailsync.cli import main
code = main(sys.argv[1:])
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        print("VMHWM", line.split()[1], file=sys.stderr)
sys.exit(code)
"""


def sync_peak_rss(mailbox: BenchMailbox) -> int:
    """Run ``emailsync sync`` for the mailbox; its peak RSS in bytes (raises if it failed)."""
    log_path = mailbox.config_path.parent / "sync.log"
    with log_path.open("wb") as log:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, "--config", str(mailbox.config_path), "sync"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            check=False,
        )
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"emailsync sync exited {done.returncode}: {text[-2000:]}")
    found = [line.split()[1] for line in text.splitlines() if line.startswith("VMHWM ")]
    if not found:
        raise RuntimeError(f"emailsync sync did not report its peak RSS: {text[-2000:]}")
    return int(found[-1]) * 1024


def backlog_peak(testbed: Testbed, count: int, seed_value: int) -> tuple[int, list[str]]:
    """Peak RSS of a sync of ``count`` backlog messages, and problems (all must be filed)."""
    mailbox = testbed.new_mailbox()
    messages = make_backlog(count, testbed.directory, random.Random(seed_value))  # noqa: S311
    seed(mailbox, messages)
    peak = sync_peak_rss(mailbox)
    return peak, _left_in_queue(mailbox, count)


def big_message_peak(testbed: Testbed, attachment_bytes: int) -> tuple[int, list[str]]:
    """Peak RSS of a sync of one linked message with an attachment of this size."""
    client_address = next(iter(testbed.directory.group_of()))
    msg = EmailMessage()
    msg["From"] = client_address
    msg["To"] = OWNER_ALIAS
    msg["Subject"] = "Signed contract"
    msg["Date"] = "Mon, 03 Mar 2025 09:00:00 +0000"
    msg["Message-ID"] = make_msgid(domain="bench.example.com")
    msg.set_content("Please find the signed contract attached.\n")
    payload = random.Random(attachment_bytes).randbytes(attachment_bytes)  # noqa: S311
    msg.add_attachment(payload, maintype="application", subtype="pdf", filename="contract.pdf")
    raw = msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    del payload, msg
    mailbox = testbed.new_mailbox()
    seed(mailbox, [BacklogMessage(raw, Outcome.RECEIVED, 1)])
    del raw
    peak = sync_peak_rss(mailbox)
    return peak, _left_in_queue(mailbox, 1)


def long_texts_peak(testbed: Testbed, count: int, text_bytes: int) -> tuple[int, list[str]]:
    """Peak RSS of a sync of ``count`` linked messages with a plain text of ``text_bytes``
    each, all in one batch: what a batch's bodies cost at once (issue 23)."""
    addresses = sorted(testbed.directory.group_of())
    rng = random.Random(text_bytes)  # noqa: S311
    messages = []
    for n in range(count):
        msg = EmailMessage()
        msg["From"] = addresses[n % len(addresses)]
        msg["To"] = OWNER_ALIAS
        msg["Subject"] = f"Survey report {n}"
        msg["Date"] = "Mon, 03 Mar 2025 09:00:00 +0000"
        msg["Message-ID"] = make_msgid(domain="bench.example.com")
        words = [rng.choice(("roof", "damp", "survey", "valuation", "garden")) for _ in range(64)]
        line = " ".join(words) + "\n"
        msg.set_content(line * (text_bytes // len(line) + 1))
        raw = msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        messages.append(BacklogMessage(raw, Outcome.RECEIVED, 1))
    mailbox = testbed.new_mailbox()
    seed(mailbox, messages)
    del messages
    peak = sync_peak_rss(mailbox)
    return peak, _left_in_queue(mailbox, count)


def _left_in_queue(mailbox: BenchMailbox, count: int) -> list[str]:
    counts = mailbox.counts()
    filed = counts[FolderRole.SENT] + counts[FolderRole.RECEIVED]
    if counts[FolderRole.QUEUE] or filed != count:
        return [f"sync: {filed} of {count} filed, {counts[FolderRole.QUEUE]} left in Queue"]
    return []
