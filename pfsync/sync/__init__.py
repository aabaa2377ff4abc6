"""Runs: the scheduled sync of every source (export, load, checkpoint), its state and locks (local
files or a record in Medplum), the schedule loop, status, metrics and the credential check.

May import: every library package below it (core, net, source, medplum, load, verify).
"""
