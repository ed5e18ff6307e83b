"""The MLEdgeDeploy update format, shared by the cloud (vendored into the Lambda bundle) and the device."""
