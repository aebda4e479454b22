"""nld-gateway replicas: the Ray Serve deployment around the NLD decoding engine (see `engine/`)."""
