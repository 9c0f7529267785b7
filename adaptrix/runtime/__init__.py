"""Kept for users: `adaptrix.runtimes.hooks` is `adaptrix.runtimes.hooks` (attach, switch, load_bundle)."""

from adaptrix.runtimes.hooks import *  # noqa: F403
from adaptrix.runtimes.hooks import __all__  # noqa: F401
