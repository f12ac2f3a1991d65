"""The one HTTP listener: health, metrics, the /v1 control API and the self-service pages.

``server`` is the listener and its limits, ``handler`` the request handler; ``routes`` the
one route table (method, path, who may call, handler) and the dispatch from it; ``api`` the
handlers of health, metrics and /v1, ``pageroutes`` those of the HTML; ``call`` what a handler
is given (``Call``, ``Access``, ``RefusedError``); ``pages`` sessions, CSRF tokens and the
templates (``templates/``); ``ports`` what the listener works with (``App``, the supervisor's
``Control``); ``control`` is the control token and the CLI's client.

May import: ``emailsync.runtime`` and below. Never ``emailsync.service``, which builds it.
"""
