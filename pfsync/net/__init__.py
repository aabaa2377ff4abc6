"""The network edge: the one request path every HTTP call goes through (retries with one classifier,
Retry-After, redirects and the address rules checked on every hop) and rate pacing.

May import: pfsync.core.
"""
