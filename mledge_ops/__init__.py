"""MLEdgeDeploy operator tooling: the `mledge` command (one module per command group)."""
