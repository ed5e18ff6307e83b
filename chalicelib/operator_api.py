"""The operator's HTTP API (Chalice routes in app.py, IAM-authorized): JSON in and out.

Errors become Chalice's HTTP errors with one-line messages: unknown model or
version -> 404, a state conflict (wrong status, training already running,
nothing to roll back) -> 409, a bad body or path -> 400.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from chalice import BadRequestError, ChaliceViewError, ConflictError, NotFoundError

from chalicelib.config import UnknownModelError
from chalicelib.operator import Operator
from chalicelib.registry import ConflictError as RegistryConflictError
from chalicelib.registry import UnknownVersionError
from chalicelib.trigger import NoDataError, TrainingInProgressError, TrainingStartError

P = ParamSpec("P")
R = TypeVar("R")


def http_errors(func: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (UnknownModelError, UnknownVersionError) as exc:
            raise NotFoundError(str(exc)) from None
        except RegistryConflictError as exc:
            raise ConflictError(str(exc)) from None
        except (TrainingInProgressError, NoDataError) as exc:
            raise ConflictError(str(exc)) from None
        except TrainingStartError as exc:
            raise ChaliceViewError(str(exc)) from None
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
    return wrapper


def parse_version(text: str) -> int:
    try:
        version = int(text)
    except (TypeError, ValueError):
        raise BadRequestError(f"version must be a whole number, got {text!r}") from None
    if version < 1:
        raise BadRequestError(f"versions start at 1, got {version}")
    return version


def _body(json_body: Any) -> dict[str, Any]:
    if json_body is None:
        return {}
    if not isinstance(json_body, dict):
        raise BadRequestError("the request body must be a JSON object")
    return json_body


def actor_of(context: dict[str, Any] | None) -> str:
    """Who called: the IAM caller's ARN from the API Gateway request context."""
    identity = (context or {}).get("identity") or {}
    return str(identity.get("userArn") or identity.get("caller") or "unknown-caller")


@http_errors
def list_models(op: Operator) -> dict[str, Any]:
    return {"models": [s.to_dict() for s in op.models()]}


@http_errors
def list_versions(op: Operator, model: str) -> dict[str, Any]:
    return {"model": model, "versions": [r.to_dict() for r in op.versions(model)]}


@http_errors
def fleet(op: Operator, model: str) -> dict[str, Any]:
    return op.fleet(model).to_dict()


@http_errors
def show_version(op: Operator, model: str, version: str) -> dict[str, Any]:
    return op.show(model, parse_version(version)).to_dict()


@http_errors
def start_training(op: Operator, model: str, json_body: Any) -> dict[str, Any]:
    body = _body(json_body)
    reason = str(body.get("reason") or "operator request (HTTP)")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise BadRequestError(f"\"force\" must be true or false, got {force!r}")
    return op.train(model, reason=reason, force=force).to_dict()


@http_errors
def promote(op: Operator, model: str, version: str, json_body: Any, actor: str) \
        -> dict[str, Any]:
    body = _body(json_body)
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise BadRequestError("promote needs a non-empty \"reason\" in the body")
    return op.promote(model, parse_version(version), reason=reason, actor=actor).to_dict()


@http_errors
def rollback(op: Operator, model: str, json_body: Any, actor: str) -> dict[str, Any]:
    body = _body(json_body)
    to = body.get("to")
    if to is not None and (isinstance(to, bool) or not isinstance(to, int)):
        raise BadRequestError(f"\"to\" must be a version number, got {to!r}")
    return op.rollback(model, to=to, reason=str(body.get("reason") or ""), actor=actor).to_dict()


@http_errors
def release(op: Operator, model: str, version: str, json_body: Any, actor: str) \
        -> dict[str, Any]:
    body = _body(json_body)
    return op.release(model, parse_version(version), reason=str(body.get("reason") or ""),
                      actor=actor).to_dict()


@http_errors
def label(op: Operator, model: str, json_body: Any, actor: str) -> dict[str, Any]:
    body = _body(json_body)
    ids = body.get("record_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BadRequestError("label needs \"record_ids\": a list of record id strings")
    verdict = body.get("verdict")
    if not isinstance(verdict, str):
        raise BadRequestError("label needs \"verdict\": \"fault\" or \"normal\"")
    return op.label(model, ids, verdict, reason=str(body.get("reason") or ""),
                    actor=actor).to_dict()
