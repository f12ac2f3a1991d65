"""What the daemon tells the outside: Prometheus metrics, structured logs, systemd notify.

``metrics`` registers every family on an injected registry and writes ``/metrics``;
``logs`` sets up the one redacting structlog chain; ``systemd`` is sd_notify glue.

May import: ``emailsync.config`` and below (model, errors, secret).
"""
