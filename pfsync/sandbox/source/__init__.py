"""The sandbox source: a SMART Backend Services + Bulk Data server that behaves like Practice
Fusion's (docs/practice-fusion.md), with fault injection for the tests.

May import: pfsync.sandbox's shared modules only; never the product packages.
"""
