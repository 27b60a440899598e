"""Backend providers: mock (no deps), cpu and cuda (torch, imported lazily)."""
