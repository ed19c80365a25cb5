"""The ground floor: errors, the graph type, the bundle format, timing and training helpers.

Nothing here imports another splitc package; every other package may import this one. Kept free
of imports so that `splitc.runtime` can use `splitc.core.errors` and `splitc.core.manifest` on a
device without torch.
"""
