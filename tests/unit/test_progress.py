"""Progress output: none for small runs, plain lines off a terminal, a rich bar on one."""

from __future__ import annotations

import io

import pytest

from emailsync.ops.progress import colour_allowed, progress

from .clocks import HandClock


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_small_runs_print_nothing() -> None:
    out = io.StringIO()
    with progress("a@example.com", out, minimum=300) as report:
        report(200, 299)
        report(299, 299)
    assert out.getvalue() == ""


def test_plain_lines_have_count_rate_and_time_left() -> None:
    out, clock = io.StringIO(), HandClock(100.0)
    with progress("a@example.com", out, minimum=300, clock=clock) as report:
        report(200, 1000)  # the first line: no rate yet
        clock.now += 1.0
        report(400, 1000)  # within 2 s of the last line: skipped
        clock.now += 1.5
        report(600, 1000)
        clock.now += 1.0
        report(1000, 1000)  # the last one always shows
    lines = out.getvalue().splitlines()
    assert lines == [
        "a@example.com: 200/1000 messages",
        "a@example.com: 600/1000 messages, 240/s, about 2 s left",
        "a@example.com: 1000/1000 messages, 286/s",
    ]


def test_terminal_gets_a_bar_with_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = FakeTerminal()
    with progress("a@example.com", out, minimum=300) as report:
        report(150, 600)
        report(600, 600)
    text = out.getvalue()
    assert "a@example.com" in text
    assert "600/600" in text
    assert "msg/s" in text
    assert "\x1b[" in text  # coloured on a terminal


def test_no_color_means_no_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out = FakeTerminal()
    assert not colour_allowed(out)
    with progress("a@example.com", out, minimum=1) as report:
        report(600, 600)
    text = out.getvalue()
    assert "600/600" in text
    assert "\x1b[3" not in text  # no colour escapes (cursor control may remain)
    assert "\x1b[9" not in text
    monkeypatch.delenv("NO_COLOR")
    assert colour_allowed(out)
    assert not colour_allowed(io.StringIO())
