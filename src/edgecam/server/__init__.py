"""The fleet server (``edgecam server``): MQTT ingest into SQLite or PostgreSQL, an HTTP API,
a web dashboard, and the clip upload client the devices use (:mod:`edgecam.server.upload`).

Imports point one way: server -> protocol, config, errors; never device or media.
"""
