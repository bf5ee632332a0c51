"""edgeprune: run-time, environment-aware pruning for CNNs split across edge devices over MQTT.

The work is done by the top-level packages ``pipeline`` (model side), ``nodes`` (device side),
``controller`` (control side) and ``traces`` (camera-trap arrivals); this package holds only
the command line.
"""

__version__ = "0.1.0"
