"""Frontends: adapter file formats -> IR."""
