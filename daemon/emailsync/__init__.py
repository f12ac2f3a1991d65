"""emailsync: files mail dropped into an IMAP Queue folder onto a CRM timeline."""

from __future__ import annotations

__version__ = "0.1.0"
