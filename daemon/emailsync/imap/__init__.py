"""IMAP adapters: the only package that imports imapclient."""
