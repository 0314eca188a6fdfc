"""`tierserve bench throughput`: how a worker's tokens/s grow with concurrent streams, with continuous
batching on and off, per tier, through the router (see `run.py`)."""
