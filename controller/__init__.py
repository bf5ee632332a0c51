"""The control side: latency window, trigger/cooldown policies, level optimizer, the controller
service, the SlimEdge planner and failure handling."""
