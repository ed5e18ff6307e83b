"""MLEdgeDeploy device agent and SDK."""
