"""Bundle passes: rewrite an existing bundle in place, atomically (calibrate, drop layers, quantize, graph upgrades)."""
