"""The CRM connector: groups looked up in a CRM over HTTPS, timeline events delivered to it."""
