"""The public entry points: compile, convert, inspect, parity, verify, and the manifest."""
