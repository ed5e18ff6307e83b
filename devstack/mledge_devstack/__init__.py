"""MLEdgeDeploy's local stack: moto server, mosquitto with TLS, an IoT Core bridge, a dispatcher.

Start it with `python -m mledge_devstack up`, or from Python with
`mledge_devstack.stack.LocalStack` (a context manager). docs/local-stack.md
describes the components and how events flow.
"""
