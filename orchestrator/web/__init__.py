"""The dashboard: server-rendered pages over the same store and views as the API.

``tunefleet server`` serves these pages beside the HTTP API; they read the same store through the
same views, so a page never shows something the API would not. The browser side is a few vendored
scripts (``static/vendor``: htmx and uPlot, see ``VERSIONS.md`` there) and ``static/charts.js``,
shipped as package data: nothing is built or fetched at install or run time.
"""
