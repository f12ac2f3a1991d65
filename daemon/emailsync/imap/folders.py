"""The folder tree's full names on one server: root and its children, by role."""

from __future__ import annotations

from dataclasses import dataclass

from emailsync.config import FolderSettings
from emailsync.model import FolderRole


@dataclass(frozen=True)
class FolderTree:
    """Full mailbox names of the tree for a server's delimiter and personal namespace.

    Dovecot's maildir++ uses ``.``, Exchange and LAYOUT=fs use ``/``, Courier puts personal
    folders under ``INBOX.``: the names come from the server's NAMESPACE (RFC 2342) reply.
    Names are kept as Unicode here; imapclient encodes them to modified UTF-7 (RFC 3501
    §5.1.3) on the wire.
    """

    root: str
    delimiter: str
    children: dict[FolderRole, str]

    @classmethod
    def build(cls, folders: FolderSettings, *, prefix: str, delimiter: str) -> FolderTree:
        """The tree below ``prefix`` (the personal namespace, e.g. ``INBOX.`` or ``""``)."""
        root = f"{prefix}{folders.root}"
        return cls(
            root=root,
            delimiter=delimiter,
            children={role: f"{root}{delimiter}{folders.name(role)}" for role in FolderRole},
        )

    def name(self, role: FolderRole) -> str:
        """The full name of a child folder."""
        return self.children[role]

    @property
    def queue(self) -> str:
        """The full name of the Queue folder."""
        return self.children[FolderRole.QUEUE]

    def all_names(self) -> list[str]:
        """Root first, then the children: the order to create them in."""
        return [self.root, *self.children.values()]
