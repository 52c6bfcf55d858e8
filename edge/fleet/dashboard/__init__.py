"""The fleet dashboard: a browser UI served by `edge fleet serve` beside the REST API.

Pages (plain JavaScript modules under ``static/``, no build step, no CDN) read the REST API
under ``/api/v1`` with the browser's session cookie, and a server-sent event stream
(:mod:`.events`) keeps them live. Browser logins (:mod:`.sessions`) are a password or an API
token exchanged for a server-side session; every mutating request made with the cookie must
carry the session's CSRF token. :class:`~edge.fleet.dashboard.routes.Dashboard` is what the
service mounts.
"""
