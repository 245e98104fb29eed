"""Load generator for a running onejump server (HTTP only): `python -m loadtest --help`."""
