"""The base layer: small utilities that every layer of moeport may import.

errors (UserError, what a user's mistake raises; WriteError, an output that could not be
written), atomic (files written under a temporary name and renamed into place, in the
mode the umask gives), buffers (when a kept buffer may be reused),
dtypes (the dtype names a profile and a backend use, and the hot path's cast).
Nothing here imports anything else from moeport; tests/test_layers.py holds that.
"""
