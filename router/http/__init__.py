"""The router's OpenAI-compatible HTTP API (server.py), served in-process beside gRPC."""
