"""The CRM connector: groups looked up in a CRM over HTTPS, timeline events delivered to it.

``store`` is the ``Store`` over the CRM (``HttpStore``); ``client`` signs (``signing``) and
sends each request; ``cache`` keeps lookups for their Cache-Control lifetime; ``callback``
serves the CRM's groups-changed notification; ``translate`` maps its answers onto errors.

May import: ``emailsync.state``, ``emailsync.telemetry``, ``emailsync.mail`` and below.
"""
