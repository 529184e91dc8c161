"""The `cistate` command line (argparse)."""
