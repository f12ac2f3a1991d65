"""Config text the unit tests build on."""

from __future__ import annotations

# The smallest config that loads: one branch, one mailbox whose password comes from the
# environment. Tests add tables to it (TOML ignores the indentation of the text around it).
MINIMAL = """
[branches.london]
host = "imap.example.com"

[[mailboxes]]
address = "agent1@example.com"
branch = "london"
password_env = "AGENT1_PASSWORD"
"""
