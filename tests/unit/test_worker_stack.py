"""The daemon's small thread stacks still parse pathologically nested mail without crashing."""

from __future__ import annotations

import textwrap

from emailsync.runtime.worker import WORKER_STACK_BYTES

from .child import python_child

CHILD = textwrap.dedent(
    """
    import sys, threading
    from emailsync.mail.message import parse_message

    def nested(depth, forwarded):
        head = "From: a@clients.example\\r\\nTo: b@example.com\\r\\nMIME-Version: 1.0\\r\\n"
        body = "Content-Type: text/plain\\r\\n\\r\\ntext\\r\\n"
        for level in range(depth):
            if forwarded:
                body = f"Content-Type: message/rfc822\\r\\n\\r\\nFrom: x@y.z\\r\\n{body}"
            else:
                b = f"b{level}"
                body = (f'Content-Type: multipart/mixed; boundary="{b}"\\r\\n\\r\\n'
                        f"--{b}\\r\\n{body}--{b}--\\r\\n")
        return (head + body).encode()

    threading.stack_size(int(sys.argv[1]))
    seen = []
    def work():
        for depth in (200, 3000):
            for forwarded in (False, True):
                seen.append(parse_message(1, nested(depth, forwarded)).problem)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(seen)
    """
)


def test_deeply_nested_mail_parses_within_a_worker_stack() -> None:
    # In a child process: a stack overflow is a segfault, which would take pytest with it.
    done = python_child(CHILD, str(WORKER_STACK_BYTES), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # 200 levels parse; 3,000 reach Python's recursion limit, which the parser turns into
    # an unusable message instead of a crash.
    assert done.stdout.strip() == str(
        [None, None, "parser error: RecursionError", "parser error: RecursionError"]
    )
