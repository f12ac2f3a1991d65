"""Config text the unit tests build on."""

from __future__ import annotations

# The branch the tests' mailboxes use.
LONDON = """
[branches.london]
host = "imap.example.com"
"""
# An [office365] table with only its required keys (the tenant and a public client).
OFFICE365 = """
[office365]
tenant_id = "t"
client_id = "c"
"""
# The smallest config that loads: one branch, one mailbox whose password comes from the
# environment. Tests add tables to it (TOML ignores the indentation of the text around it).
MINIMAL = (
    LONDON
    + """
[[mailboxes]]
address = "agent1@example.com"
branch = "london"
password_env = "AGENT1_PASSWORD"
"""
)
