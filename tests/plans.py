"""The scripts' streaming plans over literals: dicts keyed by S3 key in, steps out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from backup import BackupPlan, Compare, LocalFile, Step, plan_backup
from backup import by_content as decide_by_content
from restore import Conflict, Download, Refused, plan_restore
from s3common import Filters, RemoteObject


@dataclass
class Contents:
    """MD5s (hex) of files and of their objects, keyed by S3 key, as both_md5s
    would find them (None: the object's is not known)."""

    local: dict[str, str] = field(default_factory=dict)
    remote: dict[str, str | None] = field(default_factory=dict)


def steps_of(
    files: dict[str, LocalFile],
    objects: dict[str, RemoteObject],
    prefix: str,
    filters: Filters,
    delete: bool,
    contents: Contents | None = None,
    single_file: bool = False,
    by_content: bool = False,
) -> list[Step]:
    """The plan's steps, each side given in key order as the scripts give it; with
    `contents`, by content and each Compare decided by its MD5s."""
    steps = plan_backup(
        sorted(files.items()),
        [objects[key] for key in sorted(objects)],
        prefix,
        filters,
        delete,
        by_content=by_content or contents is not None,
        single_file=single_file,
    )
    return [
        decide_by_content(
            step, contents.local.get(step.key), contents.remote.get(step.key)
        )
        if contents is not None and isinstance(step, Compare)
        else step
        for step in steps
    ]


def plan_of(*args, **kwargs) -> BackupPlan:
    """steps_of(...) gathered into uploads, deletes and the count skipped."""
    return BackupPlan.of(steps_of(*args, **kwargs))


class RestoreSteps(NamedTuple):
    """restore.py's plan gathered: the downloads, and (key, why) of the keys refused
    and of the conflicts."""

    downloads: tuple[Download, ...]
    refused: tuple[tuple[str, str], ...]
    conflicts: tuple[tuple[str, str], ...]


def restore_plan_of(objects: dict[str, RemoteObject], *args, **kwargs) -> RestoreSteps:
    """plan_restore(...) of the objects given in key order, as the scripts list them."""
    in_key_order = [objects[key] for key in sorted(objects)]
    steps = list(plan_restore(in_key_order, *args, **kwargs))
    return RestoreSteps(
        tuple(step for step in steps if isinstance(step, Download)),
        tuple((s.key, s.why) for s in steps if isinstance(s, Refused)),
        tuple((s.key, s.why) for s in steps if isinstance(s, Conflict)),
    )
