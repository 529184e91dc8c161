"""`python -m cistate ...`: the same command line as the `cistate` console script."""

from cistate.adapters.cli.main import main

main()
