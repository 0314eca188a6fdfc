"""The tierserve worker: one model in one quantization tier, pinned to its cores, served over gRPC."""
