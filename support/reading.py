"""support/rows.py -- reading data files row by row, so that one bad row never stops a run; a progress bar.

`kept_rows` parses each row (a JSONL line, a TSV or parquet row) with the caller's parser; a row that is not UTF-8,
not JSON, nested past the parser's stack, or that the parser rejects (a missing or mistyped field, an unreadable
image, an empty answer) is reported with its file and line, skipped, and counted at the end. SFT conversations,
RL prompts and benchmark items are all read so.
"""
import json
import sys


# ----------------------------------------------------------------------------------------------------- data files
def jsonl_lines(path):
    """(line number, bytes) of each non-empty line of a JSONL file, decoded by `kept_rows` (a line that is not
    UTF-8 is a bad row there, not a file that cannot be read)."""
    with open(path, "rb") as f:
        return [(n, line) for n, line in enumerate(f, 1) if line.strip()]


def kept_rows(rows, parse, path, what):
    """[parse(row, n)] over (n, row) pairs, a JSONL line (bytes) decoded here. A row that is not JSON (nor UTF-8,
    or nested past the parser's stack) or that `parse` rejects (a missing or mistyped field, an unreadable image) is
    reported with its line number, skipped and counted: one bad row never stops a run. SFT conversations, RL prompts
    and benchmark items are all read so."""
    out, bad = [], 0
    for n, row in rows:
        try:
            out.append(parse(json.loads(row) if isinstance(row, (str, bytes)) else row, n))
        except (ValueError, KeyError, TypeError, AttributeError, SyntaxError, RecursionError) as e:
            why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            print(f"{path}:{n}: skipped ({why[:200]})", file=sys.stderr)
            bad += 1
    if bad:
        print(f"{path}: {bad} bad rows skipped, {len(out)} {what} kept", file=sys.stderr)
    return out


def progress(done, total, note="", file=None):
    """A one-line progress bar, redrawn in place: [#####.....] done/total note."""
    filled = 30 * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {note}", end="", flush=True,
          file=file or sys.stdout)


