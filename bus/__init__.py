"""The MQTT layer: topic names, typed messages, the session that owns a connection."""
