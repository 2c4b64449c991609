"""eval.py -- benchmarks through the same agent loop as RL, run greedily, scored by rules first and then a judge.

  python eval.py --bench realx --model PATH_OR_HUB_NAME [--data FILE]     # RealX-Bench (public 194), the headline
  python eval.py --bench mathvision --data data/mathvision_testmini/testmini.jsonl --limit 20   # a shipped subset
  python eval.py --bench toy --model runs/grpo/checkpoint                  # the miniature world's held-out split
  python eval.py --bench realx --no-tools ...                              # the paper's base-model-without-tools column

Benchmarks (their files: data/PROTOCOL.md): realx (parquet or JSONL: query, answer with " or " alternatives, perception / search /
reason flags, image), mathvision (JSONL), vstar and hrbench (VLMEvalKit TSV, base64 images, option letters),
mathvista and chartqa (JSONL; numbers within 5%), toy (data/world/heldout.jsonl).

Output folder: predictions.jsonl (one line per finished item, appended as its batch finishes: prediction, verdict,
the whole trajectory text with images as "<image>", and every image by path in order: the inputs, then tool-output
images saved under images/), protocol.json (prompt, temperature,
limits, judge, model: what reproduces a number). A rerun skips finished items, so a crash or Ctrl-C loses at most
the batch in flight; items that hit an infrastructure error (tool backend or judge down) are retried on a rerun and,
until then, are shown apart, never scored as wrong.
"""
import argparse
import base64
import csv
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field


import grpo as G
import model as M
import rollout as R

WHERE = {   # where each benchmark is published, and where --data looks by default
    "realx": ("hub dataset glowol/RealXBench (parquet)", "benchmarks/realx/realx.parquet"),
    "mathvision": ("hub dataset MathLLMs/MathVision (testmini jsonl + images)", "benchmarks/mathvision/testmini.jsonl"),
    "vstar": ("VLMEvalKit's VStarBench.tsv", "benchmarks/vstar/VStarBench.tsv"),
    "hrbench": ("VLMEvalKit's HRBench4K.tsv / HRBench8K.tsv", "benchmarks/hrbench/HRBench4K.tsv"),
    "mathvista": ("hub dataset AI4Math/MathVista (testmini as jsonl + images)", "benchmarks/mathvista/testmini.jsonl"),
    "chartqa": ("hub dataset HuggingFaceM4/ChartQA (test as jsonl + images)", "benchmarks/chartqa/test.jsonl"),
    "toy": ("`python data/world.py` (the miniature world)", "data/world/heldout.jsonl"),
}
LETTERS = G.LETTERS
# The paper's prompt per benchmark: code only for the VLMEvalKit sets, every tool for RealX (and the miniature's own)
PROMPT_OF = {"realx": "agent", "mathvision": "code", "vstar": "code", "hrbench": "code", "mathvista": "code",
             "chartqa": "code"}   # toy: the miniature world's own prompt, written beside its data


@dataclass
class Item:
    id: str
    question: str            # as the model sees it (options included)
    answers: list            # accepted answers (alternatives), or [letter] for multiple choice
    images: list             # paths or raw bytes, opened batch by batch
    groups: list = field(default_factory=list)   # skill flags / categories for the per-group table
    options: list = field(default_factory=list)  # option texts of multiple choice (A, B, ...)
    tolerance: float = 1e-4  # relative numeric tolerance
    data_source: str = "reason"
    image_paths: list = field(default_factory=list)   # how the record names the images


# ================================================================================================ loaders
def jsonl_rows(path):
    """(line number, row) of a JSONL file; malformed lines are reported with their number and skipped."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except ValueError as e:
                    print(f"{path}:{n}: skipped (not JSON: {e})", file=sys.stderr)


def with_options(question, options):
    if not options or options == list(LETTERS[:len(options)]):   # letters only: the choices are in the image
        return question
    return question + "\nOptions:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def realx_item(r, n, root, path):
    flags = [f for f in ("perception", "search", "reason") if int(r.get(f) or 0)]
    img = r["image"]["bytes"] if isinstance(r.get("image"), dict) else os.path.join(root, r["image"])
    return Item(str(r.get("id", n)), r["query"], [a.strip() for a in str(r["answer"]).split(" or ")], [img],
                flags + (["integration"] if len(flags) == 3 else []),
                data_source="search" if "search" in flags else "reason",
                image_paths=[r["image"] if isinstance(r["image"], str) else f"{path}#{n}"])


def mathvision_item(r, n, root, path):
    q = re.sub(r"<image\d+>", "", r["question"]).strip()
    return Item(str(r["id"]), with_options(q, r.get("options") or []), [str(r["answer"])],
                [os.path.join(root, r["image"])], [r.get("subject", "all")], r.get("options") or [],
                image_paths=[r["image"]])


def tsv_item(r, n, root, path):
    """VLMEvalKit TSV (V*, HRBench): index, image (base64), question, A..E, answer letter, category."""
    options = [r[c] for c in LETTERS if r.get(c) not in (None, "", "nan")]
    return Item(str(r["index"]), with_options(r["question"], options), [r["answer"].strip()],
                [base64.b64decode(r["image"], validate=True)], [r.get("category") or "all"], options,
                image_paths=[f"{os.path.basename(path)}#{r['index']}"])


def qa_item(r, n, root, path, tolerance=0.05):
    """MathVista / ChartQA as JSONL: question, answer, optional choices, image path; numbers within 5%."""
    choices = r.get("choices") or []
    answer = str(r["answer"])
    if choices and answer in choices:   # the gold as a letter, so "B" and the option text both score
        answer = LETTERS[choices.index(answer)]
    return Item(str(r.get("id", r.get("pid", n))), with_options(r["question"], choices), [answer],
                [os.path.join(root, r["image"])], [r.get("answer_type") or r.get("type") or "all"], choices,
                tolerance, image_paths=[r["image"]])


def toy_item(r, n, root, path):
    return Item(r["id"], r["question"], [r["answer"]], [os.path.join(root, p) for p in r["images"]],
                [r["category"]] + ([r["wording"] + " wording"] if "wording" in r else []),
                data_source=r["data_source"], image_paths=r["images"])


def file_rows(path):
    """(line or row number, row) of a JSONL, parquet or TSV benchmark file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return [(i + 1, r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    if path.endswith(".tsv"):
        csv.field_size_limit(1 << 30)
        with open(path, encoding="utf-8", newline="") as f:
            return list(enumerate(csv.DictReader(f, delimiter="\t"), 2))
    return list(jsonl_rows(path))


ITEMS = {"realx": realx_item, "mathvision": mathvision_item, "vstar": tsv_item, "hrbench": tsv_item,
         "mathvista": qa_item, "chartqa": qa_item, "toy": toy_item}


def load(bench, path):
    """The benchmark's items. Every row is checked here, its images opened once: a bad row (a missing field, an
    unreadable image) is reported with its line, skipped and counted, and the run goes on."""
    if not os.path.exists(path):
        sys.exit(f"error: {bench} data not found at {path}. Get it from {WHERE[bench][0]} on a machine with hub "
                 f"access and put it there, or pass --data FILE.")
    root, items, bad = os.path.dirname(os.path.abspath(path)), [], 0
    for n, r in file_rows(path):
        try:
            item = ITEMS[bench](r, n, root, path)
            for img in item.images:
                M.load_image(img, check_only=True)
            items.append(item)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            print(f"{path}:{n}: skipped ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
            bad += 1
    if bad:
        print(f"{path}: {bad} bad rows skipped, {len(items)} items kept", file=sys.stderr)
    return items


# ================================================================================================ scoring
def score(pred, item, judge=None):
    """-> 1.0 / 0.0, or None when the judge was unreachable (an infrastructure error, not a wrong answer). The rules
    are the training reward's own (grpo.rule_score); the judge decides only what they reject (not multiple choice)."""
    if pred is None or not str(pred).strip():
        return 0.0
    if any(G.rule_score(pred, gold, item.question, item.options, item.tolerance) for gold in item.answers):
        return 1.0
    if judge is None or item.options or re.fullmatch(r"[A-H]", item.answers[0]):
        return 0.0
    try:
        ask = judge.math if item.data_source == "reason" else judge.perception
        return ask(item.question, " or ".join(item.answers), pred)
    except G.JudgeError:
        return None


def prediction(traj):
    """The answer in <answer>, or else the final turn's text after its thinking (as VLMEvalKit scores a response
    without the tag, e.g. under the direct prompt)."""
    if traj.answer is not None:
        return traj.answer
    final = traj.response.rsplit("<|im_start|>assistant\n", 1)[-1].replace("<|im_end|>", "")
    return final.rsplit("</think>", 1)[-1].strip() or None


def record(item, traj, correct, tok, out):
    """One output line: the verdict and the whole trajectory, images by path (tool-output images saved to out/)."""
    text = re.sub(r"<\|vision_start\|>(<\|image_pad\|>)+<\|vision_end\|>", "<image>", tok.decode(traj.seq.ids))
    saved = []
    for k, img in enumerate(traj.obs_images):
        saved.append(os.path.join("images", f"{re.sub(r'[^A-Za-z0-9_.-]', '_', item.id)}-{k}.png"))
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
        img.save(os.path.join(out, saved[-1]))
    return dict(id=item.id, prediction=prediction(traj), answers=item.answers, correct=correct, groups=item.groups,
                turns=traj.turns, calls=dict(traj.calls), finish=traj.finish,
                infra_error=traj.infra_errors > 0 or correct is None, images=item.image_paths + saved, trajectory=text)


def drop_torn_line(path):
    """A kill mid-write leaves a last line without its newline: drop it (that item runs again), or the next row
    would be glued onto it and both lost."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            print(f"{path}: dropped a torn last line (its item runs again)", file=sys.stderr)


def latest_rows(path):
    """The last row written for each item id (a retried item's newer row replaces the older one)."""
    rows = {}
    for _, r in jsonl_rows(path) if os.path.exists(path) else []:
        rows[r["id"]] = r
    return rows


def evaluate(model, processor, items, out, batch=16, judge=None, **rollout_kw):
    """Run every unfinished item through the agent loop (greedy), append each result, return all rows."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "predictions.jsonl")
    drop_torn_line(path)
    done = {k for k, r in latest_rows(path).items() if not r["infra_error"]}   # infra errors are retried
    todo = [it for it in items if it.id not in done]
    t0 = time.time()
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        samples = [R.Sample([M.load_image(x) for x in it.images], it.question, it.answers[0], it.data_source, it.id)
                   for it in chunk]
        trajs = R.rollout(model, processor, samples, temperature=0.0, keep_images=True, **rollout_kw)
        with open(path, "a", encoding="utf-8") as f:
            for it, t in zip(chunk, trajs):
                row = record(it, t, score(prediction(t), it, judge), processor.tokenizer, out)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        n = i + len(chunk)
        print(f"\r[{'#' * (30 * n // len(todo))}{'.' * (30 - 30 * n // len(todo))}] {n}/{len(todo)} items "
              f"({time.time() - t0:.0f}s)", end="", flush=True, file=sys.stderr)
    if todo:
        print(file=sys.stderr)
    rows = latest_rows(path)
    return [rows[it.id] for it in items if it.id in rows]


def summarize(rows, label):
    """The table: accuracy overall and per group, tool-call rate per kind, mean turns; the item count in the label."""
    scored = [r for r in rows if not r["infra_error"]]
    groups = defaultdict(list)
    for r in scored:
        for g in r["groups"]:
            groups[g].append(r["correct"])
    acc = lambda xs: 100 * sum(xs) / len(xs) if xs else float("nan")
    calls = Counter()
    for r in scored:
        calls.update({k for k, v in r["calls"].items() if v})
    summary = dict(label=label, items=len(rows), scored=len(scored), infra_errors=len(rows) - len(scored),
                   accuracy=acc([r["correct"] for r in scored]),
                   groups={g: dict(n=len(v), accuracy=acc(v)) for g, v in sorted(groups.items())},
                   tool_rate={k: 100 * v / max(1, len(scored)) for k, v in sorted(calls.items())},
                   tool_calls_per_item=sum(sum(r["calls"].values()) for r in scored) / max(1, len(scored)),
                   mean_turns=sum(r["turns"] for r in scored) / max(1, len(scored)))
    print(f"{label} ({len(scored)} items scored" + (f", {summary['infra_errors']} with infrastructure errors, "
                                                   "not scored: rerun to retry" if summary["infra_errors"] else "")
          + ")")
    print(f"  {'overall':24s} {summary['accuracy']:6.1f}")
    for g, v in summary["groups"].items():
        print(f"  {g + ' (' + str(v['n']) + ')':24s} {v['accuracy']:6.1f}")
    print("  tool-call rate: " + (", ".join(f"{k} {v:.0f}%" for k, v in summary["tool_rate"].items()) or "none")
          + f"; calls/item {summary['tool_calls_per_item']:.2f}; mean turns {summary['mean_turns']:.2f}")
    return summary


def protocol(args, cfg):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    settings = {k: v for k, v in cfg.items() if k != "prompt"}
    return dict(bench=args.bench, data=os.path.abspath(args.data), model=args.model, commit=commit,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), judge=args.judge_url and args.judge_model,
                prompt=dict(name=args.prompt, system=cfg["prompt"].system, user=cfg["prompt"].user),
                rollout=settings, scoring="rules first (option letter / text, numbers within "
                "tolerance, normalised text), then the judge on what rules reject")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, choices=sorted(ITEMS), help="which benchmark")
    ap.add_argument("--model", default=M.DEFAULT_MODEL, help="hub name or folder of the model to evaluate")
    ap.add_argument("--data", help="benchmark file (default: see WHERE in eval.py)")
    ap.add_argument("--out", help="output folder (default runs/eval/BENCH[-notools])")
    ap.add_argument("--no-tools", action="store_true", help="no tools: a plain answer prompt, tool calls refused")
    ap.add_argument("--limit", type=int, help="only the first N items")
    ap.add_argument("--batch", type=int, default=16, help="items per rollout batch")
    ap.add_argument("--max-turns", type=int, default=11, help="model turns per item (the paper: up to 11 tool calls)")
    ap.add_argument("--max-turn-tokens", type=int, default=8192, help="tokens per model turn")
    ap.add_argument("--max-response-tokens", type=int, default=16384, help="response budget, observations included")
    ap.add_argument("--max-pixels", type=int, default=M.RL_MAX_PIXELS, help="pixel cap of input images")
    ap.add_argument("--search-url", default=None, help="search backend (default $DEEPEYES_SEARCH_URL or local)")
    ap.add_argument("--prompt", help="agent, code, direct (the original's, data/prompts/) or a system prompt file; "
                    "default: the paper's for the benchmark (code for the VLMEvalKit sets, agent for RealX), "
                    "direct with --no-tools")
    ap.add_argument("--judge-url", default=os.environ.get("JUDGE_URL"), help="OpenAI-compatible judge base URL "
                    "(default $JUDGE_URL; none: rules only)")
    ap.add_argument("--judge-model", default=os.environ.get("JUDGE_MODEL", "Qwen2.5-72B-Instruct"), help="judge model")
    ap.add_argument("--overwrite", action="store_true", help="discard the predictions already in --out")
    args = ap.parse_args(argv)
    M.check_args(ap, args, positive=("limit", "batch", "max_turns", "max_turn_tokens", "max_response_tokens",
                                     "max_pixels"))
    args.data = args.data or WHERE[args.bench][1]
    args.prompt = args.prompt or ("direct" if args.no_tools else PROMPT_OF.get(args.bench)) or \
        os.path.join(os.path.dirname(args.data), "world_system_prompt.txt")
    args.out = args.out or os.path.join("runs", "eval", args.bench + ("-notools" if args.no_tools else ""))
    return args


def rollout_config(args):
    """Greedy; image_i in the sandbox is the resized image the model sees (as the original's evaluation)."""
    return dict(max_turns=args.max_turns, max_turn_tokens=args.max_turn_tokens, tools_on=not args.no_tools,
                max_response_tokens=args.max_response_tokens, max_pixels=args.max_pixels, search_url=args.search_url,
                prompt=R.load_prompt(args.prompt), sandbox_sees="model")


def claim_output(out, proto, overwrite):
    """An output folder holds one protocol's predictions: a rerun of the same protocol resumes, another model,
    prompt, benchmark or setting is refused (its predictions would be reported as this run's)."""
    path = os.path.join(out, "protocol.json")
    keys = ("bench", "data", "model", "judge", "prompt", "rollout")
    if os.path.exists(path) and not overwrite:
        with open(path) as f:
            old = json.load(f)
        differ = [k for k in keys if old.get(k) != proto[k]]
        if differ:
            sys.exit(f"error: {out} holds predictions of another run (different {', '.join(differ)}): pass another "
                     "--out, or --overwrite to discard them")
    if overwrite:
        for name in ("predictions.jsonl", "protocol.json"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(proto, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    items = load(args.bench, args.data)[:args.limit]
    cfg = rollout_config(args)
    claim_output(args.out, protocol(args, cfg), args.overwrite)
    model, processor = M.load_model(args.model)
    judge = G.LLMJudge(args.judge_url, args.judge_model) if args.judge_url else None
    rows = evaluate(model, processor, items, args.out, args.batch, judge, **cfg)
    name = "RealX (public 194)" if args.bench == "realx" and len(items) == 194 else args.bench
    summary = summarize(rows, f"{name}, {len(items)} items" + (", no tools" if args.no_tools else ""))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
