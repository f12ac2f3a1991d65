"""One example per command, shown under its --help and in the man page."""

from __future__ import annotations

# Every command has one: tests/unit/test_cli_help.py fails for a command added without.
EXAMPLES: dict[str, str] = {
    "run": "emailsync --config /etc/emailsync/emailsync.toml run   # what the unit runs",
    "check-config": (
        "emailsync check-config\n  emailsync check-config --json\n"
        "  emailsync --config config/emailsync.toml check-config --skip-secrets"
    ),
    "setup": "emailsync setup agent1@example.com   # as root: acts as the state dir's owner",
    "sync": (
        "emailsync sync --dry-run agent1@example.com   # what would happen, nothing changed\n"
        "  emailsync sync --once                          # one pass over every enabled mailbox\n"
        "  emailsync sync --dry-run --json | jq -c 'select(.destination == \"failed\")'"
    ),
    "start-sync": (
        "emailsync start-sync agent1@example.com\n  emailsync start-sync --all\n"
        "  emailsync start-sync --include-stuck agent1@example.com"
    ),
    "stop": "emailsync stop agent1@example.com   # then `emailsync setup` starts it again",
    "status": "emailsync status\n  emailsync status --json | jq -r 'select(.queue > 0).address'",
    "retry-failed": (
        "emailsync groups add Smiths buyer@example.org && emailsync retry-failed agent1@example.com"
    ),
    "groups": "emailsync groups list",
    "groups add": "emailsync groups add 'Smith, 12 High St' buyer@example.org seller@example.net",
    "groups import": "emailsync groups import groups.csv   # header: group,address",
    "groups list": "emailsync groups list --json",
    "auth": "emailsync auth status",
    "auth login": "emailsync auth login agent3@contoso.com   # prints a URL and a code",
    "auth status": "emailsync auth status --json",
    "token": "emailsync token issue agent1@example.com",
    "token issue": (
        "emailsync token issue agent1@example.com --expires 30   # prints the token and page link"
    ),
    "token list": (
        "emailsync token list\n"
        "  emailsync token list --json | jq -r 'select(.state == \"active\") | .id'"
    ),
    "token revoke": (
        "emailsync token revoke 3f9c2a7be1d04c55         # one link (its id from `token list`)\n"
        "  emailsync token revoke agent1@example.com    # every link of the mailbox"
    ),
    "keys": "emailsync keys rotate",
    "keys rotate": "emailsync keys rotate   # every agent token stops working",
    "keys adopt": "emailsync keys adopt --yes   # after the old key was lost for good",
    "timeline": "emailsync timeline --group Smiths --limit 20\n  emailsync timeline --json",
    "doctor": "emailsync doctor agent1@example.com\n  emailsync doctor --json agent1@example.com",
    "demo": (
        "emailsync demo            # Ctrl-C to stop\n  emailsync demo --once\n"
        "  emailsync demo --crm      # events go to the reference CRM"
    ),
    "crm": "emailsync crm check",
    "crm check": "emailsync crm check   # one signed lookup; says what is wrong in one line",
    "completion": (
        "emailsync completion bash > /etc/bash_completion.d/emailsync\n"
        '  emailsync completion zsh > "${fpath[1]}/_emailsync"'
    ),
}
