"""backup.py's streaming plan over literals: two dicts keyed by S3 key in, its steps out."""

from __future__ import annotations

from backup import BackupPlan, Compare, LocalFile, Step, plan_backup
from backup import by_content as decide_by_content
from s3common import Contents, Filters, RemoteObject


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
