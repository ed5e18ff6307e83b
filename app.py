"""MLEdgeDeploy's Lambda handlers: wiring only. Each handler calls one chalicelib function."""

from __future__ import annotations

from chalice import Chalice

app = Chalice(app_name="mledgedeploy")
