"""The one HTTP listener: health, metrics, the /v1 control API and the self-service pages.

``server`` is the listener and its limits; ``pageroutes`` serves the HTML; ``pages`` holds
sessions, CSRF tokens and the templates (``templates/``); ``ports`` are the protocols the
listener asks of the supervisor; ``control`` is the control token and the CLI's client.

May import: ``emailsync.runtime`` and below. Never ``emailsync.service``, which builds it.
"""
