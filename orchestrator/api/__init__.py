"""The team server's HTTP API (``tunefleet server``): the CLI's commands over HTTP, behind tokens.

Why a package of its own: the API is a thin edge over the same store and the same command logic
(``orchestrator.views``, ``orchestrator.queue``) that the CLI uses, so both say the same thing.
``app`` builds the FastAPI application (limits, errors, metrics); ``auth`` turns a bearer token
into a caller and decides what the caller may see and do; ``jobs`` holds the routes.
"""
