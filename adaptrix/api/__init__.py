"""The public entry points: compile, convert, inspect, parity, verify, and the manifest.

Importing this package sets the process up as a compile wants it (adaptrix.api.process), so
library callers get what the CLI gets.
"""

from adaptrix.api.process import passive_openmp

passive_openmp()
