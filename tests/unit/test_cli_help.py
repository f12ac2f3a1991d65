"""--help has an example on every command; completions and the man page come from the parser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from emailsync.cli import EXAMPLES, build_parser, main, subcommands, walk_commands
from emailsync.ops.completion import bash_script, man_page, zsh_script


def test_every_command_has_an_example_in_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    paths = [path for path, _ in walk_commands(build_parser())]
    assert "groups add" in paths
    assert "doctor" in paths
    missing = [path for path in paths if path not in EXAMPLES]
    assert not missing, f"commands without an example in cli.EXAMPLES: {missing}"
    for path in paths:
        with pytest.raises(SystemExit):
            main([*path.split(), "--help"])
        assert "example:" in capsys.readouterr().out, path


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers for the last word (COMP_WORDS as bash-completion would set it)."""
    quoted = " ".join(f"'{w}'" for w in ("emailsync", *words))
    program = (
        f"source '{script}'; COMP_WORDS=({quoted}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); "
        '_emailsync; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = subprocess.run(
        ["bash", "-c", program], capture_output=True, text=True, check=True, timeout=10
    )
    return result.stdout.split()


def test_bash_completion_follows_the_parser(tmp_path: Path) -> None:
    script = tmp_path / "emailsync.bash"
    script.write_text(bash_script(build_parser()))
    assert complete(script, "gr") == ["groups"]
    assert set(complete(script, "groups", "")) >= {"add", "import", "list"}
    # An option's value is skipped when finding the command.
    assert complete(script, "--config", "x.toml", "sta") == ["start-sync", "status"]
    assert "--json" in complete(script, "timeline", "--")
    assert complete(script, "completion", "z") == ["zsh"]
    (tmp_path / "mine.toml").write_text("")
    assert complete(script, "--config", str(tmp_path / "mi")) == [str(tmp_path / "mine.toml")]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_parses(tmp_path: Path) -> None:
    script = tmp_path / "_emailsync"
    script.write_text(zsh_script(build_parser()))
    subprocess.run(["zsh", "-n", str(script)], check=True, timeout=10)


def test_zsh_completion_names_every_command() -> None:
    script = zsh_script(build_parser())
    assert script.startswith("#compdef emailsync\n")
    for path, _ in walk_commands(build_parser()):
        assert f"'{path.split()[-1]}:" in script, path


def test_man_page_is_clean_roff_with_every_command(tmp_path: Path) -> None:
    page = tmp_path / "emailsync.1"
    page.write_text(man_page(build_parser(), EXAMPLES))
    text = page.read_text()
    for path, sub in walk_commands(build_parser()):
        if subcommands(sub):
            continue  # a group of commands (groups, auth, crm): its subcommands have sections
        assert f".SS {path.replace('-', chr(92) + '-')}\n" in text, path
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed")
    result = subprocess.run(
        [groff, "-man", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 0
    assert result.stderr == ""


READ_COMMANDS = (
    "status",
    "groups list",
    "auth status",
    "timeline",
    "doctor",
    "check-config",
    "sync",
)


def test_every_read_command_has_json() -> None:
    commands = dict(walk_commands(build_parser()))
    for path in READ_COMMANDS:
        options = {o for a in commands[path]._actions for o in a.option_strings}
        assert "--json" in options, path


def test_check_config_json(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "emailsync.toml"
    assert main(["--config", str(example), "check-config", "--json"]) == 78
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["mailboxes"] == 2
    assert any("control_token_file" in p for p in report["problems"])
    assert main(["--config", str(example), "check-config", "--json", "--skip-secrets"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "config": str(example),
        "ok": True,
        "problems": [],
        "mailboxes": 2,
        "enabled": 2,
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "CONFIG", "check-config", "--skip-secrets"],
        ["check-config", "--config", "CONFIG", "--skip-secrets"],
        ["check-config", "--skip-secrets", "--config", "CONFIG"],
    ],
    ids=["before", "after", "last"],
)
def test_config_option_is_accepted_before_or_after_the_command(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--config` works wherever an operator or a unit file puts it (issue 18)."""
    config = Path(__file__).resolve().parents[2] / "config" / "emailsync.toml"
    assert main([str(config) if a == "CONFIG" else a for a in argv]) == 0
    assert ": ok (" in capsys.readouterr().out


def test_config_after_the_command_wins_over_one_before() -> None:
    """A command's own --config overrides the global one; without it the global one stays."""
    parser = build_parser()
    assert parser.parse_args(["--config", "a", "run", "--config", "b"]).config == Path("b")
    assert parser.parse_args(["--config", "a", "run"]).config == Path("a")
    assert parser.parse_args(["run"]).config is None


@pytest.mark.parametrize(
    "argv", [["run", "--bogus"], ["no-such-command"], ["groups", "add"], ["sync", "--once=x"]]
)
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A usage error exits 64 (EX_USAGE), which the units list in RestartPreventExitStatus."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 64
    assert "usage:" in capsys.readouterr().err
