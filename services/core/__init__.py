"""Code shared by the api and socket services: wire formats, settings, broker, logs, metrics.

Nothing here imports a web framework or either service; the services meet only on the wire.
"""
