"""MLEdgeDeploy cloud pipeline: everything the Lambda handlers in app.py call."""
