"""`mledge models | versions | show | train | promote | rollback | release | label`: the registry's operator commands.

Only argument parsing and printing: the work is `chalicelib.operator.Operator`.
Every command prints a readable table (or `--json`); errors print one line to
stderr and exit 1.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from chalicelib.config import ConfigError, UnknownModelError
from chalicelib.operator import Operator
from chalicelib.registry import RegistryError, VersionRecord
from chalicelib.settings import SettingsError
from chalicelib.trigger import TriggerError
from mledge_ops.common import aws_options
from mledge_ops.stage import runtime_for, stage_options

EXIT_ERROR = 1


def _operator(args: argparse.Namespace) -> Operator:
    rt = runtime_for(args)
    return Operator(clients=rt.clients, settings=rt.settings, config=rt.config)


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


def register(sub: Any) -> None:
    """Add this group's subcommands to the `mledge` parser."""

    def add(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) \
            -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text, description=help_text,
                                parents=[stage_options(), aws_options()])
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        parser.set_defaults(func=_guarded(handler))
        return parser

    add("models", "list the models with their current release and latest version", cmd_models)
    p = add("versions", "list a model's versions with status and metrics", cmd_versions)
    p.add_argument("model")
    p = add("show", "show one version: lineage, gate reasons, release, history", cmd_show)
    p.add_argument("model")
    p.add_argument("version", type=int)
    p = add("fleet", "show the current release's rollout: each device's update status",
            cmd_fleet)
    p.add_argument("model")
    p = add("train", "start a training of a model now", cmd_train)
    p.add_argument("model")
    p.add_argument("--reason", default="operator request", help="recorded with the training")
    p.add_argument("--force", action="store_true",
                   help="train even without new records since the last training")
    p = add("promote", "approve a REJECTED version (recorded as a manual override)", cmd_promote)
    p.add_argument("model")
    p.add_argument("version", type=int)
    p.add_argument("--reason", required=True, help="why the gate is overridden (recorded)")
    p = add("rollback", "release an older version of a model again", cmd_rollback)
    p.add_argument("model")
    p.add_argument("--to", type=int, default=None, metavar="VERSION",
                   help="the version to go back to (default: the previous release)")
    p.add_argument("--reason", default="", help="recorded with the rollback")
    p = add("release", "package and release an APPROVED version again (its release failed)",
            cmd_release)
    p.add_argument("model")
    p.add_argument("version", type=int)
    p.add_argument("--reason", default="", help="recorded with the retry")
    p = add("label", "give readings a verdict: fault or normal (kept out of training / "
                     "scored by the gate)", cmd_label)
    p.add_argument("model")
    p.add_argument("verdict", choices=["fault", "normal"])
    p.add_argument("record_ids", nargs="+", metavar="RECORD_ID")
    p.add_argument("--reason", default="", help="recorded with the verdicts")


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (UnknownModelError, RegistryError, TriggerError, ConfigError, SettingsError,
                ValueError) as exc:
            print(f"mledge {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return run


# ---------------------------------------------------------------- output helpers


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                out: TextIO | None = None) -> None:
    out = out or sys.stdout
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _score(record: VersionRecord, section: str) -> float | None:
    metrics = record.metrics or {}
    metric = metrics.get("metric") or (record.gate or {}).get("metric")
    value = (metrics.get(section) or {}).get(metric) if metric else None
    return float(value) if isinstance(value, int | float) else None


# ---------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    summaries = _operator(args).models()
    if args.json:
        _print_json([s.to_dict() for s in summaries])
        return 0
    print_table(
        ["MODEL", "FAMILY", "METRIC", "THRESHOLD", "RELEASED", "SCORE", "LATEST", "STATUS",
         "TRAINING"],
        [[s.model, s.family, s.metric, s.threshold,
          f"v{s.released_version}" if s.released_version else None, s.released_score,
          f"v{s.latest_version}" if s.latest_version else None, s.latest_status,
          f"v{s.training_version}" if s.training_version else None] for s in summaries],
    )
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    records = _operator(args).versions(args.model)
    if args.json:
        _print_json([r.to_dict() for r in records])
        return 0
    if not records:
        print(f"{args.model} has no versions yet")
        return 0
    print_table(
        ["VERSION", "STATUS", "METRIC", "CHALLENGER", "CHAMPION", "GATE", "CREATED", "JOB"],
        [[f"v{r.version}", r.status, (r.metrics or {}).get("metric"), _score(r, "challenger"),
          _score(r, "champion"), _gate_word(r), r.created_at, r.job_name]
         for r in reversed(records)],
    )
    return 0


def _gate_word(record: VersionRecord) -> str | None:
    if record.override:
        return "override"
    if not record.gate:
        return None
    return "approved" if record.gate.get("approved") else "rejected"


def cmd_show(args: argparse.Namespace) -> int:
    record = _operator(args).show(args.model, args.version)
    if args.json:
        _print_json(record.to_dict())
        return 0
    print(f"{record.model} v{record.version}: {record.status}")
    print(f"  created  {record.created_at}")
    print(f"  updated  {record.updated_at}")
    if record.artifact:
        print(f"  artifact {record.artifact}")
    if record.failure_reason:
        print(f"  failure  {record.failure_reason}")
    if record.gate:
        print("gate:", "approved" if record.gate.get("approved") else "rejected")
        for reason in record.gate.get("reasons", []):
            print(f"  - {reason}")
    if record.override:
        print(f"override: by {record.override.get('by')} at {record.override.get('at')}: "
              f"{record.override.get('reason')}")
    if record.metrics:
        data = record.metrics.get("data") or {}
        print("metrics:")
        print(f"  challenger {json.dumps(record.metrics.get('challenger'), sort_keys=True)}")
        print(f"  champion   {json.dumps(record.metrics.get('champion'), sort_keys=True)}")
        print(f"  parity     {json.dumps(record.metrics.get('parity'), sort_keys=True)}")
        print(f"  data       {json.dumps(data, sort_keys=True)}")
    if record.release:
        print(f"release: {json.dumps(record.release, sort_keys=True, default=str)}")
    if record.lineage:
        print("lineage:")
        for key in sorted(record.lineage):
            value = record.lineage[key]
            shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            print(f"  {key}: {shown}")
    print("history:")
    for entry in record.history:
        arrow = f"{entry.get('from') or '-'} -> {entry.get('to')}" if entry.get("to") else "note"
        print(f"  {entry.get('at')}  {arrow}  {entry.get('reason') or ''}".rstrip())
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    state = _operator(args).fleet(args.model)
    if args.json:
        _print_json(state.to_dict())
        return 0
    if state.job_id is None:
        print(f"{state.model}: nothing released yet (thing group {state.thing_group})")
        return 0
    counts = ", ".join(f"{n} {status}" for status, n in state.counts.items()) or "no devices"
    print(f"{state.model} v{state.released_version}: job {state.job_id} ({state.job_status}); "
          f"{counts}")
    print_table(["THING", "STATUS"], [[thing, status] for thing, status in state.things.items()])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    started = _operator(args).train(args.model, reason=args.reason, force=args.force)
    if args.json:
        _print_json(started.to_dict())
        return 0
    print(f"started training of {started.model} v{started.version}: {started.backend} job "
          f"{started.job_name} on {started.records} records ({started.objects} objects)")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    result = _operator(args).promote(args.model, args.version, reason=args.reason, actor=_actor())
    if args.json:
        _print_json(result.to_dict())
        return 0
    note = "ModelApproved sent" if result.announced else "ModelApproved had already been sent"
    print(f"{args.model} v{args.version} is {result.record.status} (manual override); {note}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    request = _operator(args).rollback(args.model, to=args.to, reason=args.reason, actor=_actor())
    if args.json:
        _print_json(request.to_dict())
        return 0
    print(f"rollback of {request.model} from v{request.replaces} to v{request.version} "
          f"requested (ModelApproved {request.event_id}); packaging releases it to the fleet")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    request = _operator(args).release(args.model, args.version, reason=args.reason, actor=_actor())
    if args.json:
        _print_json(request.to_dict())
        return 0
    print(f"release of {request.model} v{request.version} requested again (attempt "
          f"{request.attempt}, ModelApproved {request.event_id}); packaging releases it")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    result = _operator(args).label(args.model, args.record_ids, args.verdict, reason=args.reason,
                               actor=_actor())
    if args.json:
        _print_json(result.to_dict())
        return 0
    print(f"{result.records} readings of {result.model} labelled {result.verdict} "
          f"(s3 {result.key}); the next training uses them")
    return 0
