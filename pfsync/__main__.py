"""`python -m pfsync`."""

from pfsync.cli import main

main()
