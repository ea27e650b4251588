"""`python -m lstmd.clients.cli` runs the `lstmd` command line."""

from lstmd.clients.cli import main

main()
