"""Conformance kit: a pytest suite any BackendProvider implementation can run."""
