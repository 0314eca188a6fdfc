"""The tierserve router: the one service clients see; picks a worker per request and relays its stream."""
