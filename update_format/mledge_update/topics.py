"""The MQTT topics devices and the cloud agree on.

Telemetry: a device publishes to `dt/mledge/<model>/<thing>/<kind>`; the IoT topic
rule selects those into the telemetry queue, naming the levels. IoT Jobs: AWS's
reserved topics under `$aws/things/<thing>/jobs/`.
"""

from __future__ import annotations

TELEMETRY_ROOT = "dt/mledge"
TELEMETRY_FILTER = f"{TELEMETRY_ROOT}/+/+/+"  # every model, thing and kind
# The topic rule of infra/pipeline.yaml (the local stack applies the same projection).
TELEMETRY_RULE_SQL = (
    "SELECT *, topic(3) AS model, topic(4) AS thing, topic(5) AS type, "
    f"timestamp() AS received_at FROM '{TELEMETRY_FILTER}'"
)


def telemetry_topic(model: str, thing: str, kind: str = "telemetry") -> str:
    return f"{TELEMETRY_ROOT}/{model}/{thing}/{kind}"


def parse_telemetry_topic(topic: str) -> tuple[str, str, str] | None:
    """(model, thing, kind) of a telemetry topic, None for any other topic."""
    levels = topic.split("/")
    if len(levels) != 5 or "/".join(levels[:2]) != TELEMETRY_ROOT:
        return None
    return levels[2], levels[3], levels[4]


def jobs_topic_root(thing: str) -> str:
    """The IoT Jobs topics of one thing start with this."""
    return f"$aws/things/{thing}/jobs"


# What a device may ask IoT Jobs (the service answers on `<request>/accepted|rejected`).
JOBS_REQUEST_FILTERS = (
    "$aws/things/+/jobs/start-next",
    "$aws/things/+/jobs/get",
    "$aws/things/+/jobs/+/get",
    "$aws/things/+/jobs/+/update",
)
