"""The stage engine: cache keys, done markers, atomic writes, locks, units and worker processes. The only place that
knows about caching.

A stage's key hashes its params, its hand-bumped `VERSION` and its inputs' digests (`keys`). A unit writes its files
under temp names and renames them when complete (`files`), so a SIGKILL loses only the units in flight and never
leaves a truncated file under a final name; units run under their own locks, in worker processes or array tasks
(`pool`); `Stage.execute` is the preamble every stage shares and `Stage.finalize` writes the done marker last
(`stage`). `--workers` and the task flags are not in the key.
"""

from pipeline.engine.files import (
    append_line,
    atomic_write,
    canonical_json,
    disk_full_is_user_error,
    file_lock,
    read_json,
    sha256_file,
    unwritable_is_user_error,
    write_json,
)
from pipeline.engine.keys import (
    MARKER,
    Input,
    changed_fields,
    describe_changes,
    fingerprint_source,
    output_digest,
    stage_key,
)
from pipeline.engine.pool import exit_with_parent, task_slice
from pipeline.engine.stage import (
    PLAN,
    Advance,
    QuietReporter,
    Reporter,
    Stage,
    StageResult,
    StageState,
    finished_marker,
    inspect,
    stage_input_path,
)

__all__ = [
    "MARKER", "PLAN", "Advance", "Input", "QuietReporter", "Reporter", "Stage", "StageResult", "StageState",
    "append_line", "atomic_write", "canonical_json", "changed_fields", "describe_changes",
    "disk_full_is_user_error", "exit_with_parent", "file_lock", "fingerprint_source", "finished_marker", "inspect",
    "output_digest", "read_json", "sha256_file", "stage_input_path", "stage_key", "task_slice",
    "unwritable_is_user_error", "write_json",
]
