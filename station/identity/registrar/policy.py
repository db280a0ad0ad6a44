"""The device policy document: read it and catch what AWS would reject, before any board.

AWS IoT answers a bad document with MalformedPolicyException at CreatePolicy; checking
here first names the file and the statement. (moto accepts any document, so the tests
rely on this check and on the mapping of AWS's answer in aws_iot.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from station.errors import RegistrationError

MAX_POLICY_BYTES = 2048
"""AWS IoT policy documents are at most 2048 characters without whitespace."""


def load_policy(path: Path) -> dict[str, Any]:
    """The parsed document; raises RegistrationError naming the file and the fault."""
    try:
        text = path.read_text()
    except OSError as e:
        raise RegistrationError(f"policy document {path}: cannot be read ({e.strerror})") \
            from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise RegistrationError(f"policy document {path}: not valid JSON ({e})") from None
    problem = policy_problem(doc)
    if problem:
        raise RegistrationError(f"policy document {path} is invalid: {problem}")
    return dict(doc)


def policy_problem(doc: Any) -> str | None:
    """What is wrong with an AWS IoT policy document, or None."""
    if not isinstance(doc, dict):
        return "the document must be a JSON object"
    if doc.get("Version") not in ("2012-10-17", None):
        return f"Version must be \"2012-10-17\", not {doc.get('Version')!r}"
    statements = doc.get("Statement")
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        return "Statement must be a non-empty list"
    for i, st in enumerate(statements):
        where = f"Statement[{i}]"
        if not isinstance(st, dict):
            return f"{where} must be an object"
        if st.get("Effect") not in ("Allow", "Deny"):
            return f"{where}.Effect must be \"Allow\" or \"Deny\", not {st.get('Effect')!r}"
        for key in ("Action", "Resource"):
            value = st.get(key)
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not values or \
                    not all(isinstance(v, str) and v for v in values):
                return f"{where}.{key} must be a string or a list of strings"
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        for action in actions:
            if not (action == "*" or action.startswith("iot:")):
                return f"{where}.Action {action!r} is not an AWS IoT action (iot:...)"
        unknown = set(st) - {"Sid", "Effect", "Action", "Resource", "Condition"}
        if unknown:
            return f"{where} has unknown keys {sorted(unknown)}"
    compact = json.dumps(doc, separators=(",", ":"))
    if len(compact) > MAX_POLICY_BYTES:
        return f"{len(compact)} characters without whitespace; AWS allows {MAX_POLICY_BYTES}"
    return None


def same_policy(a: str | dict[str, Any], b: str | dict[str, Any]) -> bool:
    """Whether two documents say the same (whitespace and key order do not count)."""
    try:
        da = json.loads(a) if isinstance(a, str) else a
        db = json.loads(b) if isinstance(b, str) else b
    except json.JSONDecodeError:
        return False
    return bool(da == db)
