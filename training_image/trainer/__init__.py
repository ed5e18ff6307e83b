"""MLEdgeDeploy trainer: the training container's entrypoint and model families."""
