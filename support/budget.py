"""The reader's path against its budgets: `python -m support.budget` prints, for each of the six stage files, its
lines, its Python tokens (comments, blank lines and indentation not counted; a docstring is one token) and its lines
over 100 columns, then the totals against the budgets (2,400 lines, 20,000 tokens, 450 lines a file). It exits 1
when a budget is broken. A first reading can skip it: it measures the code, it is not part of it."""
import io
import os
import sys
import tokenize

STAGES = ["model.py", "tools.py", "rollout.py", "sft.py", "grpo.py", "eval.py"]
MAX_LINES, MAX_TOKENS, MAX_FILE_LINES, MAX_COLUMNS = 2400, 20000, 450, 100
LAYOUT = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING,
          tokenize.ENDMARKER}


def measure(path):
    """-> (lines, Python tokens, lines over MAX_COLUMNS) of one file."""
    src = open(path, encoding="utf-8").read()
    lines = src.splitlines()
    tokens = sum(1 for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type not in LAYOUT)
    return len(lines), tokens, sum(len(line) > MAX_COLUMNS for line in lines)


def main(root=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")):
    total_lines = total_tokens = total_wide = 0
    ok = True
    print(f"{'file':12s} {'lines':>6s} {'tokens':>7s} {'>100 cols':>10s}")
    for name in STAGES:
        lines, tokens, wide = measure(os.path.join(root, name))
        total_lines, total_tokens, total_wide = total_lines + lines, total_tokens + tokens, total_wide + wide
        ok &= lines <= MAX_FILE_LINES and not wide
        print(f"{name:12s} {lines:6d} {tokens:7d} {wide:10d}" + ("   over budget" if lines > MAX_FILE_LINES or wide
                                                                  else ""))
    ok &= total_lines <= MAX_LINES and total_tokens <= MAX_TOKENS
    print(f"{'together':12s} {total_lines:6d} {total_tokens:7d} {total_wide:10d}   budgets: {MAX_LINES} lines, "
          f"{MAX_TOKENS} tokens, {MAX_FILE_LINES} lines a file, none over {MAX_COLUMNS} columns: "
          + ("met" if ok else "NOT met"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
