"""The fleet server (``edgecam server``): MQTT ingest into SQLite or PostgreSQL, an HTTP API,
a web dashboard (the devices' clip upload client is :mod:`edgecam.device.upload`).

Imports point one way: server -> protocol, config, errors; never device or media.
"""
