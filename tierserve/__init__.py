"""tierserve: one model, several quantization tiers, routed by latency budget and accuracy tolerance."""

__version__ = "0.1.0"
