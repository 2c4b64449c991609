"""eval.py -- benchmarks through the same agent loop as RL, greedy, scored as the paper scored them.

  python eval.py --bench RealX --model PATH_OR_HUB_NAME     # RealX-Bench (public 194), the headline
  python eval.py --bench all --model PATH_OR_HUB_NAME       # the paper's 22 beside its numbers
  python eval.py --bench MathVision_testmini --limit 20     # a subset shipped in data/, offline
  python eval.py --bench toy --model runs/mini/grpo/best/checkpoint --data data/world/heldout.jsonl
  python eval.py --bench RealX --no-tools ...               # the base-model-without-tools column
  python eval.py report runs/eval/RealX                     # every item's turns in one HTML page

The paper's protocol per benchmark (data/PROTOCOL.md, Evaluation): greedy, at most 11 model calls,
at most 20480 new tokens a model turn; the `code` prompt for the VLMEvalKit sets, `agent` for RealX
and the search sets, `direct` with --no-tools; a response without <answer> is scored on its final
text. The VLMEvalKit sets run as the authors' fork of VLMEvalKit ran them (support/fork.py): each
image sent, each turn read and each observation returned as its loop did.
Scoring follows VLMEvalKit per benchmark (BENCHES below): multiple choice by letter or option text,
then the judge maps a free answer to an option; ChartQA relaxed (5%); OCRBench substring of any
reference (a count out of 1000, as printed in the paper); the math sets by rules, then the
original's math judge; RealX and the search sets by alias lists, then the original's judge.

Files: a VLMEvalKit benchmark is one TSV (index, base64 image or a list of them, question, A..
options, answer, category); the search sets are JSONL or parquet rows with a question, an answer (or
a list) and aliases, and an image (bytes, base64 or a path); RealX is parquet. Missing files are
fetched where a public URL is known (VLMEvalKit's, checked against its MD5; RealX from the hub) into
$DEEPEYES_DATA (default ~/.cache/deepeyesv2/benchmarks); offline, one line says where to get the
file and where to put it.

Output folder (runs/eval/BENCH): predictions.jsonl (one line per item, appended as the item
finishes: prediction, verdict, the whole trajectory text with images as "<image>", every image by
path: the inputs, then tool-output images saved under images/) and protocol.json (model, prompt,
limits, judge, scorer: what reproduces a number; a different protocol in the same folder is
refused). A rerun skips finished items; items that hit an infrastructure error (tool backend or
judge down) are retried and, until then, shown apart, never scored as wrong.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict


import model as M
import rollout as R
from support import flags, reading, runs
from support import report as html_report
from support import fork
from support.benchmarks import BENCHES, PAPER, default_path, fetch, load, missing, wemath_strict
from support.scoring import JudgeError, LLMJudge, judged_choice, ocr_match, rule_score

HERE = os.path.dirname(os.path.abspath(__file__))


# ============================================= the loop: each item through the agent, one line each
def evaluate(model, processor, items, out, batch=16, judge=None, send=None, **rollout_kw):
    """Run every unfinished item through the agent loop (greedy), append each result as soon as its
    trajectory ends (an interrupt loses only the items in flight), return all rows. `send`: what
    becomes of an image before the model sees it (the VLMEvalKit sets: as the authors' fork sent
    it, support/fork.py)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "predictions.jsonl")
    drop_torn_line(path)
    done = {k for k, r in latest_rows(path).items() if not r["infra_error"]}   # infra: retried
    todo = [it for it in items if it.id not in done]
    send = send or (lambda image: image)
    t0, finished = time.time(), [0]
    with open(path, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch):
            chunk = {it.id: it for it in todo[i:i + batch]}

            def write(t):   # called by the rollout the moment a trajectory ends
                it = chunk[t.sample.id]
                row = record(it, t, score(prediction(t), it, judge), processor.tokenizer, out)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                finished[0] += 1
                reading.progress(finished[0], len(todo), f"items ({time.time() - t0:.0f}s)",
                                 file=sys.stderr)
            samples = [R.Sample([send(M.load_image(x)) for x in it.images], it.question,
                                it.answers[0], it.data_source, it.id) for it in chunk.values()]
            R.rollout(model, processor, samples, temperature=0.0, keep_images=True, on_done=write,
                      **rollout_kw)
    if todo:
        print(file=sys.stderr)
    rows = latest_rows(path)
    return [rows[it.id] for it in items if it.id in rows]


# ========================================================================================== scoring
def score(pred, item, judge=None):
    """-> 1.0 / 0.0, or None when the judge was unreachable (an infrastructure error, not a wrong
    answer). The sets support/fork.py knows as the authors' fork scored them; the rest by the
    training reward's rules (support.scoring.rule_score), then the judge on what they reject, as
    VLMEvalKit does."""
    if pred is None or not str(pred).strip():
        return 0.0
    if item.scorer == "ocr":   # OCRBench: any reference contained in the answer
        return float(any(ocr_match(pred, gold, item.groups) for gold in item.answers))
    if item.scorer in fork.SCORERS:   # as the authors' fork scored the set
        try:
            return fork.score(pred, item, judge)
        except JudgeError:
            return None
    if any(rule_score(pred, gold, item.question, item.options, item.tolerance)
           for gold in item.answers):
        return 1.0
    if judge is None:
        return 0.0
    try:
        if item.options:   # VLMEvalKit's "extract the choice" step
            return float(judged_choice(judge, item, pred) == item.answers[0])
        math = item.scorer == "math" or item.data_source == "reason"
        ask = judge.math if math else judge.perception
        return ask(item.question, " or ".join(item.answers), pred)
    except JudgeError:
        return None


def prediction(traj):
    """The answer in <answer>, or else the final turn's text after its thinking (as VLMEvalKit
    scores a response without the tag, e.g. under the direct prompt)."""
    if traj.answer is not None:
        return traj.answer
    final = traj.response.rsplit("<|im_start|>assistant\n", 1)[-1].replace("<|im_end|>", "")
    return final.rsplit("</think>", 1)[-1].strip() or None


def record(item, traj, correct, tok, out):
    """One output line: the verdict and the whole trajectory, every image by path in order (the
    inputs as the benchmark names them, or saved under out/images/ when they came as bytes; then the
    tool outputs' images)."""
    text = re.sub(r"<\|vision_start\|>(<\|image_pad\|>)+<\|vision_end\|>", "<image>",
                  tok.decode(traj.seq.ids))
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", item.id)
    images = []
    for k, img in enumerate([*item.images, *traj.obs_images]):
        if isinstance(img, str):   # an input file: named as the benchmark names it
            images.append(item.image_paths[k])
            continue
        images.append(os.path.join("images", f"{stem}-{k}.png"))
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
        (M.load_image(img) if isinstance(img, bytes) else img).save(os.path.join(out, images[-1]))
    return dict(id=item.id, question=item.question, prediction=prediction(traj),
                answers=item.answers, correct=correct, groups=item.groups, turns=traj.turns,
                calls=dict(traj.calls), finish=traj.finish, images=images, trajectory=text,
                infra_error=traj.infra_errors > 0 or correct is None,
                as_the_fork_did=fork.as_the_fork_did(prediction(traj), item),
                **({"problem": item.problem} if item.problem else {}))


def summarize(rows, label, show=True):
    """The table: accuracy overall and per group, tool-call rate per kind, mean turns; the item
    count in the label. show: print it too."""
    scored = [r for r in rows if not r["infra_error"]]
    groups = defaultdict(list)
    for r in scored:
        for g in r["groups"]:
            groups[g].append(r)
    acc = lambda xs: 100 * sum(xs) / len(xs) if xs else float("nan")
    calls_per_item = lambda rs: sum(sum(r["calls"].values()) for r in rs) / max(1, len(rs))
    calls = Counter()
    for r in scored:
        calls.update({k for k, v in r["calls"].items() if v})
    group = lambda v: dict(n=len(v), accuracy=acc([r["correct"] for r in v]),
                           tool_calls=calls_per_item(v))
    summary = dict(label=label, items=len(rows), scored=len(scored),
                   infra_errors=len(rows) - len(scored),
                   accuracy=acc([r["correct"] for r in scored]),
                   groups={g: group(v) for g, v in sorted(groups.items())},
                   tool_rate={k: 100 * v / max(1, len(scored)) for k, v in sorted(calls.items())},
                   tool_calls_per_item=calls_per_item(scored),
                   mean_turns=sum(r["turns"] for r in scored) / max(1, len(scored)),
                   # the fork's bugs at work: items its own code scored otherwise (support/fork.py)
                   fork_bugs=sum(r.get("as_the_fork_did") not in (None, r["correct"])
                                 for r in scored))
    if any("problem" in r for r in rows):   # WeMath: the paper quotes its strict score
        summary["metric"] = ("Score (Strict)", wemath_strict(rows))
    if show:
        infra = f", {summary['infra_errors']} with infrastructure errors, not scored: rerun"
        print(f"{label} ({len(scored)} items scored{infra if summary['infra_errors'] else ''})")
        print(f"  {'overall':24s} {summary['accuracy']:6.1f}")
        if "metric" in summary:
            print(f"  {summary['metric'][0]:24s} {summary['metric'][1]:6.1f}")
        for g, v in summary["groups"].items():
            print(f"  {g + ' (' + str(v['n']) + ')':24s} {v['accuracy']:6.1f}   tool calls/item "
                  f"{v['tool_calls']:.2f}")
        rates = ", ".join(f"{k} {v:.0f}%" for k, v in summary["tool_rate"].items()) or "none"
        print(f"  tool-call rate: {rates}; calls/item {summary['tool_calls_per_item']:.2f}; "
              f"mean turns {summary['mean_turns']:.2f}")
        if summary["fork_bugs"]:
            print(f"  the authors' fork scored {summary['fork_bugs']} of them otherwise (its bugs: "
                  "README)")
    return summary


# ================================================================================ the output folder
def drop_torn_line(path):
    """A kill mid-write leaves a last line without its newline: drop it (that item runs again), or
    the next row would be glued onto it and both lost."""
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
    lines = reading.jsonl_lines(path) if os.path.exists(path) else []
    for r in reading.kept_rows(lines, lambda r, n: r, path, "rows"):
        rows[r["id"]] = r
    return rows


def forked(bench):
    """The VLMEvalKit sets run as the authors' VLMEvalKit fork ran them (support/fork.py): images
    sent as it sent them, turns read and observations returned as its loop did."""
    return BENCHES[bench].loader == "tsv"


def protocol(args, bench, data, cfg):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:
        commit = ""
    settings = {k: getattr(v, "__name__", v) for k, v in cfg.items()
                if k not in ("prompt", "search_url")}   # read / observe: by name
    return dict(bench=bench, data=os.path.abspath(data), model=args.model, commit=commit,
                weights=runs.model_fingerprint(args.model), search_url=args.search_url,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), judge=args.judge_url and args.judge_model,
                prompt=dict(name=prompt_of(args, bench, data), system=cfg["prompt"].system,
                            user=cfg["prompt"].user),
                rollout=settings, scorer=BENCHES[bench].scorer,
                images="as the authors' fork sent them" if forked(bench) else "as they are",
                rules="option letter / text, numbers within tolerance, normalised text over the "
                "aliases (support.scoring.rule_score); then the judge on what they reject")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, help="a benchmark, a comma-separated list, or `all` "
                    "(the paper's 22), in any case; one of: " + ", ".join(BENCHES))
    ap.add_argument("--model", default=M.DEFAULT_MODEL,
                    help="hub name or folder of the model to evaluate")
    ap.add_argument("--data", help="the benchmark's file (one benchmark only; default: "
                    "$DEEPEYES_DATA/FILE, fetched when a public URL is known)")
    ap.add_argument("--out", help="output folder (default runs/eval/BENCH[-notools]; with several "
                    "benchmarks, one folder each inside it)")
    ap.add_argument("--no-tools", action="store_true",
                    help="no tools: the direct prompt, tool calls refused")
    ap.add_argument("--limit", type=int, help="only the first N items of each benchmark")
    ap.add_argument("--batch", type=int, default=16, help="items per rollout batch")
    ap.add_argument("--max-turns", type=int, default=11, help="model calls per item (the authors' "
                    "fork: at most 11; the 11th call's code is never seen)")
    ap.add_argument("--max-turn-tokens", type=int, default=20480,
                    help="new tokens per model turn (the paper)")
    ap.add_argument("--max-response-tokens", type=int, default=32768,
                    help="response budget, observations included")
    ap.add_argument("--max-pixels", type=int, default=M.RL_MAX_PIXELS,
                    help="pixel cap of input images")
    ap.add_argument("--search-url", default=None,
                    help="search backend (default $DEEPEYES_SEARCH_URL or local)")
    ap.add_argument("--prompt", help="agent, code, direct (the original's, data/prompts/) or a "
                    "system prompt file; default: the paper's for each benchmark (code for the "
                    "VLMEvalKit sets, agent for RealX and the search sets), direct with --no-tools")
    ap.add_argument("--judge-url", default=os.environ.get("JUDGE_URL"), help="OpenAI-compatible "
                    "judge base URL (default $JUDGE_URL; none: rules only)")
    ap.add_argument("--judge-model", default=os.environ.get("JUDGE_MODEL", "Qwen2.5-72B-Instruct"),
                    help="judge model")
    ap.add_argument("--overwrite", action="store_true",
                    help="discard the predictions already in --out")
    args = ap.parse_args(argv)
    flags.check_args(ap, args, positive=("limit", "batch", "max_turns", "max_turn_tokens",
                                         "max_response_tokens", "max_pixels"))
    by_name = {b.lower(): b for b in BENCHES}   # names in any case: realx is RealX
    args.benches = PAPER if args.bench.lower() == "all" else \
        [by_name.get(b.strip().lower(), b) for b in args.bench.split(",")]
    unknown = [b for b in args.benches if b not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    if args.data and len(args.benches) > 1:
        ap.error("--data names the file of one benchmark")
    try:   # a missing prompt file is found now, not after the model has loaded
        args.prompt and R.load_prompt(args.prompt)
    except FileNotFoundError as e:
        ap.error(str(e))
    return args


def prompt_of(args, bench, data):
    """--prompt, else the paper's for the benchmark; the miniature's own prompt lies beside its
    data."""
    if args.prompt or args.no_tools:
        return args.prompt or "direct"
    return BENCHES[bench].prompt or os.path.join(os.path.dirname(data), "world_system_prompt.txt")


def rollout_config(args, bench, prompt):
    """Greedy; image_i in the sandbox is the resized image the model sees (as the original's); the
    VLMEvalKit sets' turns read and observations sent as the authors' fork did."""
    return dict(max_turns=args.max_turns, max_turn_tokens=args.max_turn_tokens,
                max_response_tokens=args.max_response_tokens, max_pixels=args.max_pixels,
                search_url=args.search_url, tools_on=not args.no_tools,
                prompt=R.load_prompt(prompt), sandbox_sees="model",
                **(dict(read=fork.read_turn, observe=fork.observe) if forked(bench) else {}))


def claim_output(out, proto, overwrite):
    """An output folder holds one protocol's predictions: a rerun of the same protocol resumes,
    another model, prompt, benchmark or setting is refused (its predictions would be reported as
    this run's)."""
    path = os.path.join(out, "protocol.json")
    # the weights by their content (a checkpoint is replaced in place by every save); not the search
    # URL: items that met a search outage are retried against a new one
    keys = ("bench", "data", "model", "weights", "judge", "prompt", "rollout", "images")
    if os.path.exists(path) and not overwrite:
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            sys.exit(f"error: {path} is unreadable: pass another --out, or --overwrite to discard "
                     "its predictions")
        differ = [k for k in keys if old.get(k) != proto[k]]
        if differ:
            sys.exit(f"error: {out} holds predictions of another run (different "
                     f"{', '.join(differ)}): pass another --out, or --overwrite to discard them")
    if overwrite:
        for name in ("predictions.jsonl", "protocol.json"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    runs.write_atomic(path, json.dumps(proto, indent=1))


def print_table(results):
    """One row a benchmark: our number beside the paper's (OCRBench as a count out of 1000, as the
    paper prints)."""
    cell = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
    print(f"\n{'benchmark':22s} {'ours':>7s} {'DeepEyesV2':>11s} {'Qwen2.5-VL':>11s} {'items':>6s} "
          f"{'tools/item':>10s} {'turns':>6s}  scored")
    for name, r in results.items():
        paper = BENCHES[name].paper
        if isinstance(r, str):
            print(f"{name:22s} {'-':>7s} {cell(paper[0]):>11s} {cell(paper[1]):>11s}  {r}")
            continue
        scale = 10 if BENCHES[name].scorer == "ocr" else 1   # OCRBench: out of 1000
        ours = r["metric"][1] if "metric" in r else r["accuracy"] * scale
        print(f"{name:22s} {ours:7.1f} {cell(paper[0]):>11s} {cell(paper[1]):>11s} "
              f"{r['scored']:6d} {r['tool_calls_per_item']:10.2f} {r['mean_turns']:6.2f}  "
              + ("as the fork" if fork.scores(BENCHES[name]) else "ours"))
    print("scored as the fork: as the authors' VLMEvalKit fork scores that set (support/fork.py); "
          "ours: rules, then the judge (not yet the fork's way for that set)")


def report(run_dir, data_root=None):
    """RUN_DIR/report.html: every item's turns, code, tool outputs and images (support/report.py
    draws it)."""
    path = os.path.join(run_dir, "predictions.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: no predictions.jsonl in {run_dir}: run eval.py first")
    proto_path = os.path.join(run_dir, "protocol.json")
    proto = json.load(open(proto_path)) if os.path.exists(proto_path) else {}
    rows = list(latest_rows(path).values())
    label = proto.get("bench", os.path.basename(run_dir.rstrip("/")))
    return html_report.write_html(run_dir, rows, summarize(rows, label, show=False), proto,
                                  data_root)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        ap = argparse.ArgumentParser(description="write RUN_DIR/report.html: every item's turns, "
                                     "code, tool outputs and images, in one offline page")
        ap.add_argument("run_dir", help="an eval output folder (predictions.jsonl, protocol.json)")
        return report(ap.parse_args(argv[1:]).run_dir)
    args = parse_args(argv)
    model = processor = None
    results = {}
    judge = LLMJudge(args.judge_url, args.judge_model) if args.judge_url else None
    for bench in args.benches:
        data = args.data or fetch(bench, default_path(bench)) or default_path(bench)
        if not os.path.exists(data):   # one benchmark: say where the file comes from; more: go on
            if len(args.benches) == 1:
                sys.exit(missing(bench, data))
            results[bench] = f"not run: no file at {data} ({BENCHES[bench].source})"
            continue
        items = load(bench, data)[:args.limit]
        if not items:   # an empty or wholly bad file: no number, rather than a NaN
            if len(args.benches) == 1:
                sys.exit(f"error: no usable items in {data}")
            results[bench] = f"not run: no usable items in {data}"
            continue
        cfg = rollout_config(args, bench, prompt_of(args, bench, data))
        folder = bench + ("-notools" if args.no_tools else "")
        out = os.path.join("runs", "eval", folder) if not args.out else \
            os.path.join(args.out, folder) if len(args.benches) > 1 else args.out
        claim_output(out, protocol(args, bench, data, cfg), args.overwrite)
        if model is None:
            model, processor = M.load_model(args.model)
        send = fork.as_the_fork_sends if forked(bench) else None
        rows = evaluate(model, processor, items, out, args.batch, judge, send, **cfg)
        name = "RealX (public 194)" if bench == "RealX" and len(items) == 194 else bench
        label = f"{name}, {len(items)} items" + (", no tools" if args.no_tools else "")
        results[bench] = summarize(rows, label)
    print_table(results)
    print(json.dumps(results))
    return results[args.benches[0]] if len(args.benches) == 1 else results


if __name__ == "__main__":
    main()
