"""splitc: a split compiler for deep-learning inference across the edge-cloud continuum.

Kept free of imports on purpose: `splitc.runtime` must load on a device that has neither torch nor
the compiler, and importing it imports this package first.
"""

__version__ = "0.1.0"
