"""Operator tools: the `mledge` command line."""
