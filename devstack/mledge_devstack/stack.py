"""The local stack as one object: start, use, stop, leave nothing running.

```python
from mledge_devstack.stack import LocalStack

with LocalStack() as stack:                 # .devstack/ under the project root
    thing = stack.provision_thing("sensor-001", model="vibration-anomaly")
    ...                                     # run agents with thing.cert_path/key_path/ca_path
    stack.wait_for_job(job_id, timeout=120) # the rollout's end state, counted
```

Processes (each in its own process group, stopped SIGTERM -> SIGKILL):
mosquitto (TLS on 127.0.0.1), the cloud process (moto server + IoT bridge),
and the dispatcher (invokes app.py's handlers). The environment the handlers
and tools need is in `stack.env` and in `<directory>/env.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chalicelib.aws import AwsClients
from chalicelib.config import load_pipeline_config
from chalicelib.settings import Settings, SettingsError, chalice_stage_environment
from mledge_devstack.broker import BRIDGE_CLIENT, MosquittoBroker
from mledge_devstack.certs import ClientCredentials, LocalCA
from mledge_devstack.mqtt import MqttClient
from mledge_devstack.procs import ManagedProcess, free_port
from mledge_devstack.resources import provision_stage, provision_thing

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]
DEFAULT_DIRECTORY = PROJECT_DIR / ".devstack"
PART_DIRS = ("", "update_format", "edge", "training_image", "devstack")
REGION = "us-east-1"
TERMINAL_JOB_STATUSES = ("COMPLETED", "CANCELED", "DELETION_IN_PROGRESS")


class StackClients(AwsClients):
    """AwsClients with the stack's fake credentials: works without any AWS env or profile."""

    def client(self, service: str) -> Any:
        if service not in self._cache:
            import boto3
            from botocore.config import Config

            config = Config(retries={"max_attempts": 5, "mode": "standard"},
                            s3={"addressing_style": "path"})
            self._cache[service] = boto3.client(
                service, region_name=self.region, endpoint_url=self.endpoint_url, config=config,
                aws_access_key_id="testing", aws_secret_access_key="testing")
        return self._cache[service]


class StackError(Exception):
    """The local stack could not start, or a wait on it ran out."""


class JobWaitTimeoutError(StackError):
    """A job still had pending executions when the wait ran out."""


@dataclass(frozen=True)
class ThingCredentials(ClientCredentials):
    """A simulated thing: its certificate files and where its broker is."""

    host: str = "localhost"
    port: int = 0
    thing_arn: str = ""
    model: str | None = None
    release_keys_path: Path | None = None  # the stage's release public key (PEM)


@dataclass
class StackInfo:
    """What `env.json` holds: enough for another process to use or stop the stack."""

    directory: str
    project_dir: str
    stage: str
    endpoint_url: str
    mqtt_host: str
    mqtt_port: int
    ca_path: str
    certs_dir: str
    dead_letter_dir: str
    env: dict[str, str]
    release_keys_path: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    routes: list[dict[str, str]] = field(default_factory=list)
    owner_pid: int = 0  # the process that started (and will stop) the stack

    @classmethod
    def load(cls, directory: Path = DEFAULT_DIRECTORY) -> StackInfo:
        path = Path(directory) / "env.json"
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise StackError(f"no local stack described in {path} (is it up?)") from None


def stage_environment(project_dir: Path, stage: str) -> dict[str, str]:
    """The stage's environment variables from `.chalice/config.json` (global, then stage)."""
    try:
        return chalice_stage_environment(project_dir / ".chalice" / "config.json", stage)
    except SettingsError as exc:
        raise StackError(str(exc)) from None


def child_environment(project_dir: Path, stack_env: dict[str, str]) -> dict[str, str]:
    """os.environ + the stack's settings + a PYTHONPATH that imports this checkout's parts."""
    env = dict(os.environ)
    env.update(stack_env)
    env["PYTHONPATH"] = os.pathsep.join(str(project_dir / d) if d else str(project_dir)
                                        for d in PART_DIRS)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalStack:
    """moto server + mosquitto + IoT bridge + dispatcher, provisioned for one stage."""

    def __init__(self, directory: Path | str = DEFAULT_DIRECTORY, *,
                 project_dir: Path | str = PROJECT_DIR, app_dir: Path | str | None = None,
                 stage: str = "dev",
                 pipeline_config: Path | str | None = None,
                 extra_env: dict[str, str] | None = None, dispatcher: bool = True,
                 extra_routes: dict[str, str] | None = None, max_attempts: int = 3,
                 start_timeout: float = 60.0) -> None:
        self.directory = Path(directory).resolve()
        self.project_dir = Path(project_dir).resolve()
        # app.py + .chalice/ to serve; another folder only for tests of the stack itself.
        self.app_dir = Path(app_dir).resolve() if app_dir else self.project_dir
        self.stage = stage
        self.pipeline_config = Path(pipeline_config).resolve() if pipeline_config else None
        self.extra_env = dict(extra_env or {})
        self.run_dispatcher = dispatcher
        self.extra_routes = dict(extra_routes or {})
        self.max_attempts = max_attempts
        self.start_timeout = start_timeout
        self.certs_dir = self.directory / "certs"
        self.logs_dir = self.directory / "logs"
        self.dead_letter_dir = self.directory / "dead-letter"
        self.release_keys_path = self.certs_dir / "release-keys.pem"
        self.env: dict[str, str] = {}
        self.info: StackInfo | None = None
        self.ca: LocalCA | None = None
        self.broker: MosquittoBroker | None = None
        self.cloud: ManagedProcess | None = None
        self.dispatcher: ManagedProcess | None = None
        self._clients: AwsClients | None = None
        self._settings: Settings | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in ("cloud.ready", "dispatcher.ready", "env.json"):
            (self.directory / stale).unlink(missing_ok=True)
        self.ca = LocalCA.create(self.certs_dir)
        server_cert, server_key = self.ca.issue_server()
        self.ca.issue_client(BRIDGE_CLIENT)
        moto_port, mqtt_port = free_port(), free_port()
        endpoint = f"http://127.0.0.1:{moto_port}"

        self.env = stage_environment(self.app_dir, self.stage)
        self.env.update({
            "MLEDGE_STAGE": self.env.get("MLEDGE_STAGE", self.stage),
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "MLEDGE_DEVSTACK_DIR": str(self.directory),
            "MLEDGE_DEVSTACK_MQTT_HOST": "localhost",
            "MLEDGE_DEVSTACK_MQTT_PORT": str(mqtt_port),
            "MLEDGE_DEVSTACK_CA": str(self.ca.ca_path),
        })
        if self.pipeline_config:
            self.env["MLEDGE_PIPELINE_CONFIG"] = str(self.pipeline_config)
        self.env.update(self.extra_env)
        self._settings = Settings.from_env(self.env)
        child_env = child_environment(self.project_dir, self.env)

        # mosquitto and the cloud process start side by side; the bridge retries until
        # the broker listens.
        self.broker = MosquittoBroker(self.directory / "broker", mqtt_port, ca=self.ca.ca_path,
                                      cert=server_cert, key=server_key)
        self.broker.process.start()
        cloud_ready = self.directory / "cloud.ready"
        self.cloud = ManagedProcess("cloud", [
            sys.executable, "-m", "mledge_devstack.cloud", "--port", str(moto_port),
            "--mqtt-port", str(mqtt_port), "--certs", str(self.certs_dir),
            "--region", REGION, "--telemetry-queue", self._settings.telemetry_queue,
            "--ready-file", str(cloud_ready),
        ], log_path=self.logs_dir / "cloud.log", env=child_env, cwd=self.project_dir).start()
        self.broker.start_wait(timeout=self.start_timeout)
        self.cloud.wait_until(cloud_ready.exists, timeout=self.start_timeout,
                              what="serving moto and bridging MQTT")

        provisioned = provision_stage(self.clients, self._settings)
        self.release_keys_path.write_bytes(provisioned["release_keys_pem"])
        routes: list[dict[str, str]] = []
        if self.run_dispatcher:
            routes = self._start_dispatcher(child_env, provisioned["queues"])
        self.info = StackInfo(
            directory=str(self.directory), project_dir=str(self.project_dir), stage=self.stage,
            endpoint_url=endpoint, mqtt_host="localhost", mqtt_port=mqtt_port,
            ca_path=str(self.ca.ca_path), certs_dir=str(self.certs_dir),
            dead_letter_dir=str(self.dead_letter_dir), env=self.env,
            release_keys_path=str(self.release_keys_path), pids=self.pids(),
            routes=routes, owner_pid=os.getpid(),
        )
        (self.directory / "env.json").write_text(json.dumps(asdict(self.info), indent=2))
        log.info("local stack up: moto %s, mosquitto localhost:%d", endpoint, mqtt_port)

    def _start_dispatcher(self, child_env: dict[str, str], queues: list[str]) -> list[dict[str, str]]:
        ready = self.directory / "dispatcher.ready"
        argv = [sys.executable, "-m", "mledge_devstack.dispatcher",
                "--project-dir", str(self.app_dir), "--stage", self.stage,
                "--dead-letter-dir", str(self.dead_letter_dir), "--ready-file", str(ready),
                "--max-attempts", str(self.max_attempts)]
        for queue in queues:
            argv += ["--watch-queue", queue]
        for queue, handler in self.extra_routes.items():
            argv += ["--route", f"{queue}={handler}"]
        self.dispatcher = ManagedProcess("dispatcher", argv, log_path=self.logs_dir / "dispatcher.log",
                                         env=child_env, cwd=self.project_dir).start()
        self.dispatcher.wait_until(ready.exists, timeout=self.start_timeout,
                                   what="polling the handlers' queues")
        return list(json.loads(ready.read_text())["routes"])

    def stop(self) -> None:
        """Stop every process (dispatcher first: no handler runs against a dying moto)."""
        for proc in (self.dispatcher, self.cloud, self.broker.process if self.broker else None):
            if proc is not None:
                proc.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        procs = {"mosquitto": self.broker.process if self.broker else None,
                 "cloud": self.cloud, "dispatcher": self.dispatcher}
        return {name: p.pid for name, p in procs.items() if p is not None and p.pid is not None}

    # ------------------------------------------------------------------- using it

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            raise StackError("the stack is not started")
        return self._settings

    @property
    def clients(self) -> AwsClients:
        """boto3 clients for the stack's moto server (explicit endpoint; no env needed)."""
        if self._clients is None:
            self._clients = StackClients(region=self.settings.region,
                                         endpoint_url=self.settings.endpoint_url)
        return self._clients

    @property
    def mqtt_port(self) -> int:
        return int(self.env["MLEDGE_DEVSTACK_MQTT_PORT"])

    def credentials(self, name: str) -> ClientCredentials:
        """A client certificate for any MQTT identity (made on first use)."""
        if self.ca is None:
            raise StackError("the stack is not started")
        return self.ca.issue_client(name)

    def provision_thing(self, thing_name: str, model: str | None = None) -> ThingCredentials:
        """Register a thing in moto, in its model's thing group, with its own certificate."""
        group = None
        if model is not None:
            group = load_pipeline_config(self.settings.pipeline_config).model(model).thing_group
        arn = provision_thing(self.clients, thing_name, group)
        creds = self.credentials(thing_name)
        return ThingCredentials(creds.name, creds.cert_path, creds.key_path, creds.ca_path,
                                host="localhost", port=self.mqtt_port, thing_arn=arn, model=model,
                                release_keys_path=self.release_keys_path)

    def mqtt_client(self, name: str) -> MqttClient:
        """An unconnected MQTT client with `name`'s certificate (client id = name)."""
        return MqttClient(self.credentials(name), port=self.mqtt_port)

    def job_execution_states(self, job_id: str) -> dict[str, str]:
        """thing name -> execution status, through the IoT API."""
        states: dict[str, str] = {}
        paginator_args: dict[str, Any] = {"jobId": job_id, "maxResults": 250}
        while True:
            page = self.clients.iot.list_job_executions_for_job(**paginator_args)
            for summary in page.get("executionSummaries", []):
                thing = summary["thingArn"].rsplit("/", 1)[-1]
                states[thing] = summary["jobExecutionSummary"]["status"]
            if not page.get("nextToken"):
                return states
            paginator_args["nextToken"] = page["nextToken"]

    def wait_for_job(self, job_id: str, *, timeout: float = 120.0,
                     poll: float = 0.5) -> dict[str, Any]:
        """Wait until no execution of the job is QUEUED or IN_PROGRESS (or the job ended).

        Returns `{"status", "counts": jobProcessDetails, "executions": {thing: status}}`.
        """
        deadline = time.monotonic() + timeout
        while True:
            job = self.clients.iot.describe_job(jobId=job_id)["job"]
            states = self.job_execution_states(job_id)
            pending = [t for t, s in states.items() if s in ("QUEUED", "IN_PROGRESS")]
            result = {"status": job["status"], "counts": job.get("jobProcessDetails", {}),
                      "executions": states}
            if not pending and (states or job["status"] in TERMINAL_JOB_STATUSES):
                return result
            if time.monotonic() > deadline:
                raise JobWaitTimeoutError(
                    f"job {job_id}: {len(pending)} execution(s) still pending after "
                    f"{timeout:.0f}s: {result}")
            time.sleep(poll)

    def dead_letters(self) -> list[dict[str, Any]]:
        """Messages the dispatcher gave up on, with their errors."""
        if not self.dead_letter_dir.exists():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.dead_letter_dir.glob("*.json"))]


@contextlib.contextmanager
def local_stack(**kwargs: Any) -> Iterator[LocalStack]:
    stack = LocalStack(**kwargs)
    try:
        yield stack.start()
    finally:
        stack.stop()
