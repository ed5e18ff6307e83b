"""The demo: one scenario told end to end on the local stack.

`python -m mledge_devstack.demo` (run.py: the run loop, the fleet, the scenarios);
record.py is the typed record of a run, report.py turns it into `summary.json` and
`report.html`, display.py draws the terminal, device.py is one demo thing (the agent plus
a scenario-controlled sensor), pipeline.toml the demo's pipeline config.
"""
