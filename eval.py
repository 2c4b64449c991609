"""eval.py -- benchmarks through the same agent loop as RL, run greedily, scored as the paper scored them.

  python eval.py --bench RealX --model PATH_OR_HUB_NAME                     # RealX-Bench (public 194), the headline
  python eval.py --bench all --model PATH_OR_HUB_NAME                       # the paper's 22 beside its numbers
  python eval.py --bench MathVision_testmini --limit 20                     # a subset shipped in data/, offline
  python eval.py --bench toy --model runs/mini/grpo/checkpoint --data data/world/heldout.jsonl   # the miniature
  python eval.py --bench RealX --no-tools ...                               # the base-model-without-tools column

The paper's protocol per benchmark (data/PROTOCOL.md, Evaluation): greedy, up to 11 tool calls, at most 20480 new
tokens a model turn; the `code` prompt for the VLMEvalKit sets, `agent` for RealX and the search sets, `direct` with
--no-tools; a response without <answer> is scored on its final text. Scoring follows VLMEvalKit per benchmark
(BENCHES below): multiple choice by letter or option text, then the judge maps a free answer to an option; ChartQA
relaxed (5%); OCRBench substring of any reference (a count out of 1000, as printed in the paper); the math sets by
rules, then the original's math judge; RealX and the search sets by alias lists, then the original's judge.

Files: a VLMEvalKit benchmark is one TSV (index, base64 image or a list of them, question, A.. options, answer,
category); the search sets are JSONL or parquet rows with a question, an answer (or a list) and aliases, and an
image (bytes, base64 or a path); RealX is parquet. Missing files are fetched where a public URL is known (VLMEvalKit's,
checked against its MD5; RealX from the hub) into $DEEPEYES_DATA (default ~/.cache/deepeyesv2/benchmarks); offline,
one line says where to get the file and where to put it.

Output folder (runs/eval/BENCH): predictions.jsonl (one line per item, appended as the item finishes: prediction,
verdict, the whole trajectory text with images as "<image>", every image by path: the inputs, then tool-output
images saved under images/) and protocol.json (model, prompt, limits, judge, scorer: what reproduces a number; a
different protocol in the same folder is refused). A rerun skips finished items; items that hit an infrastructure
error (tool backend or judge down) are retried and, until then, shown apart, never scored as wrong.
"""
import argparse
import ast
import base64
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import requests

import grpo as G
import model as M
import rollout as R

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.environ.get("DEEPEYES_DATA", os.path.join(os.path.expanduser("~"), ".cache", "deepeyesv2", "benchmarks"))
LETTERS = G.LETTERS
VLMEVAL = "https://opencompass.openxlab.space/utils/VLMEval/"
HF = "https://huggingface.co/datasets/"


# ================================================================= the loop: each item through the agent, one line each
def evaluate(model, processor, items, out, batch=16, judge=None, **rollout_kw):
    """Run every unfinished item through the agent loop (greedy), append each result as soon as its trajectory ends
    (an interrupt loses only the items in flight), return all rows."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "predictions.jsonl")
    drop_torn_line(path)
    done = {k for k, r in latest_rows(path).items() if not r["infra_error"]}   # infra errors are retried
    todo = [it for it in items if it.id not in done]
    t0, finished = time.time(), [0]
    with open(path, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch):
            chunk = {it.id: it for it in todo[i:i + batch]}

            def write(t):   # called by the rollout the moment a trajectory ends
                it = chunk[t.sample.id]
                f.write(json.dumps(record(it, t, score(prediction(t), it, judge), processor.tokenizer, out),
                                   ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                finished[0] += 1
                M.progress(finished[0], len(todo), f"items ({time.time() - t0:.0f}s)", file=sys.stderr)
            samples = [R.Sample([M.load_image(x) for x in it.images], it.question, it.answers[0], it.data_source,
                                it.id) for it in chunk.values()]
            R.rollout(model, processor, samples, temperature=0.0, keep_images=True, on_done=write, **rollout_kw)
    if todo:
        print(file=sys.stderr)
    rows = latest_rows(path)
    return [rows[it.id] for it in items if it.id in rows]


# ================================================================================================ scoring
def score(pred, item, judge=None):
    """-> 1.0 / 0.0, or None when the judge was unreachable (an infrastructure error, not a wrong answer). The rules
    are the training reward's own (grpo.rule_score); the judge decides what they reject, as VLMEvalKit does."""
    if pred is None or not str(pred).strip():
        return 0.0
    if item.scorer == "ocr":   # OCRBench: any reference contained in the answer
        return float(any(ocr_match(pred, gold, item.groups) for gold in item.answers))
    if any(G.rule_score(pred, gold, item.question, item.options, item.tolerance) for gold in item.answers):
        return 1.0
    if judge is None or item.scorer == "relaxed":   # ChartQA: relaxed accuracy alone, as VLMEvalKit
        return 0.0
    try:
        if item.options or item.scorer == "mcq":   # VLMEvalKit's "extract the choice" step
            return float(judged_choice(judge, item, pred) == item.answers[0])
        ask = judge.math if item.scorer == "math" or item.data_source == "reason" else judge.perception
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
    """One output line: the verdict and the whole trajectory, every image by path in order (the inputs as the
    benchmark names them, or saved under out/images/ when they came as bytes; then the tool outputs' images)."""
    text = re.sub(r"<\|vision_start\|>(<\|image_pad\|>)+<\|vision_end\|>", "<image>", tok.decode(traj.seq.ids))
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", item.id)
    images = []
    for k, img in enumerate([*item.images, *traj.obs_images]):
        if isinstance(img, str):   # an input file: named as the benchmark names it
            images.append(item.image_paths[k])
            continue
        images.append(os.path.join("images", f"{stem}-{k}.png"))
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
        (M.load_image(img) if isinstance(img, bytes) else img).save(os.path.join(out, images[-1]))
    return dict(id=item.id, question=item.question, prediction=prediction(traj), answers=item.answers,
                correct=correct, groups=item.groups, turns=traj.turns, calls=dict(traj.calls), finish=traj.finish,
                infra_error=traj.infra_errors > 0 or correct is None, images=images, trajectory=text,
                **({"problem": item.problem} if item.problem else {}))


def summarize(rows, label, show=True):
    """The table: accuracy overall and per group, tool-call rate per kind, mean turns; the item count in the label.
    show: print it too."""
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
    summary = dict(label=label, items=len(rows), scored=len(scored), infra_errors=len(rows) - len(scored),
                   accuracy=acc([r["correct"] for r in scored]),
                   groups={g: dict(n=len(v), accuracy=acc([r["correct"] for r in v]), tool_calls=calls_per_item(v))
                           for g, v in sorted(groups.items())},
                   tool_rate={k: 100 * v / max(1, len(scored)) for k, v in sorted(calls.items())},
                   tool_calls_per_item=calls_per_item(scored),
                   mean_turns=sum(r["turns"] for r in scored) / max(1, len(scored)))
    if any("problem" in r for r in rows):   # WeMath: the paper quotes its strict score, not plain accuracy
        summary["metric"] = ("Score (Strict)", wemath_strict(rows))
    if show:
        print(f"{label} ({len(scored)} items scored" + (f", {summary['infra_errors']} with infrastructure errors, "
                                                       "not scored: rerun to retry" if summary["infra_errors"] else "")
              + ")")
        print(f"  {'overall':24s} {summary['accuracy']:6.1f}")
        if "metric" in summary:
            print(f"  {summary['metric'][0]:24s} {summary['metric'][1]:6.1f}")
        for g, v in summary["groups"].items():
            print(f"  {g + ' (' + str(v['n']) + ')':24s} {v['accuracy']:6.1f}   tool calls/item {v['tool_calls']:.2f}")
        print("  tool-call rate: " + (", ".join(f"{k} {v:.0f}%" for k, v in summary["tool_rate"].items()) or "none")
              + f"; calls/item {summary['tool_calls_per_item']:.2f}; mean turns {summary['mean_turns']:.2f}")
    return summary


# ================================================================================================ the benchmarks
@dataclass
class Bench:
    loader: str                 # tsv (VLMEvalKit) | realx | search | mathvision (MATH-V jsonl) | toy
    scorer: str                 # mcq | relaxed | ocr | math | vqa (aliases, then the judge)
    prompt: str                 # the paper's prompt set for it
    file: str                   # its file under $DEEPEYES_DATA (or in this repository: data/...)
    source: str                 # where it is published
    url: str = ""               # fetched from here when missing ("" = by hand)
    md5: str = ""               # VLMEvalKit's checksum of that file ("" = none known)
    paper: tuple = (None, None)   # the paper's DeepEyesV2 and Qwen2.5-VL-7B numbers (None: not reported)
    hub: str = ""               # a hub dataset holding the file (RealX)


def vlmevalkit(name, scorer, paper=(None, None), url=None, md5=""):
    """A VLMEvalKit benchmark: one TSV, the code prompt; url None = VLMEvalKit's usual address."""
    return Bench("tsv", scorer, "code", f"{name}.tsv", f"VLMEvalKit's {name}.tsv (its dataset code lists the URL)",
                 VLMEVAL + f"{name}.tsv" if url is None else url, md5, paper)


def search_set(name, source, paper):
    return Bench("search", "vqa", "agent", f"{name}.jsonl", source, paper=(paper, None))


BENCHES = {
    "VStarBench": vlmevalkit("VStarBench", "mcq", (81.8, 78.5),
                             HF + "xjtupanda/VStar_Bench/resolve/main/VStarBench.tsv"),
    "HRBench4K": vlmevalkit("HRBench4K", "mcq", (77.9, 71.6), HF + "DreamMr/HR-Bench/resolve/main/hr_bench_4k.tsv",
                            "f6b041b03d49543494b8a56d2e35be65"),
    "HRBench8K": vlmevalkit("HRBench8K", "mcq", (73.8, 67.9), HF + "DreamMr/HR-Bench/resolve/main/hr_bench_8k.tsv",
                            "274c9c7f89329b804a4723178a00219c"),
    # VLMEvalKit builds MME-RealWorld.tsv from the JSON of hub dataset yifanzhang114/MME-RealWorld-Base64: no one URL
    "MME-RealWorld": vlmevalkit("MME-RealWorld", "mcq", (64.9, 57.3), "", "271c33ec814c39533c467ec6fb8a6f36"),
    "MME-RealWorld-Lite": vlmevalkit("MME-RealWorld-Lite", "mcq", url=HF + "yifanzhang114/MME-RealWorld-Base64/resolve/"
                                     "main/mme_realworld_lite.tsv", md5="4c17057d7d3b6c4a0d4397c3dae0881c"),
    "TreeBench": vlmevalkit("TreeBench", "mcq", url=HF + "HaochenWang/TreeBench/resolve/main/TreeBench.tsv"),
    "SEEDBench2_Plus": vlmevalkit("SEEDBench2_Plus", "mcq"),
    "OCRBench": vlmevalkit("OCRBench", "ocr", (882, 864), md5="e953d98a987cc6e26ef717b61260b778"),
    "CharXiv_descriptive_val": vlmevalkit("CharXiv_descriptive_val", "vqa", md5="8507c3740f8ddaedcb6b5c1cfcb3fa06"),
    "CharXiv_reasoning_val": vlmevalkit("CharXiv_reasoning_val", "vqa", md5="6fc1a522ad32c2e3d72a89857b8cf10b"),
    "ChartQA_TEST": vlmevalkit("ChartQA_TEST", "relaxed", (88.4, 86.2), md5="c902e0aa9be5582a7aad6dcf52734b42"),
    "MathVista_MINI": vlmevalkit("MathVista_MINI", "math", (71.9, 68.3), md5="f199b98e178e5a2a20e7048f5dcb0464"),
    "MathVision": vlmevalkit("MathVision", "math", (28.9, 25.6), md5="93f6de14f7916e598aa1b7165589831e"),
    "MathVerse_MINI": vlmevalkit("MathVerse_MINI", "math", (52.7, 45.6), "http://opencompass.openxlab.space/utils/"
                                 "benchmarks/MathVerse/MathVerse_MINIV.tsv", "5017caca32b7fa110c350a1bea861b65"),
    "WeMath": vlmevalkit("WeMath", "mcq", md5="b5e969a075f01290a542411fb7766388"),   # reported: Score (Strict)
    "DynaMath": vlmevalkit("DynaMath", "math", md5="b8425ad9a7114571fc9366e013699494"),
    "LogicVista": vlmevalkit("LogicVista", "math", md5="41c5d33adf33765c399e0e6ae588c061"),
    "RealX": Bench("realx", "vqa", "agent", "RealXBench.parquet", "hub dataset glowol/RealXBench (parquet)",
                   paper=(28.3, 22.3), hub="glowol/RealXBench"),
    "FVQA-test": search_set("FVQA-test", "MMSearch-R1's release (FVQA test split, parquet or JSONL)", 60.6),
    "InfoSeek": search_set("InfoSeek", "MMSearch-R1's release (InfoSeek split, parquet or JSONL)", 51.1),
    "MMSearch": search_set("MMSearch", "the MMSearch release (its JSON as JSONL)", 63.7),
    "SimpleVQA": search_set("SimpleVQA", "the SimpleVQA release (JSONL)", 59.4),
    # not in the paper's table: a real subset shipped here, and the miniature world
    "MathVision_testmini": Bench("mathvision", "math", "code", "data/mathvision_testmini/testmini.jsonl",
                                 "shipped: 129 items of MATH-V's testmini (data/mathvision_testmini/)"),
    "toy": Bench("toy", "vqa", "", "data/world/heldout.jsonl", "`python data/world.py` (the miniature world)"),
}


PAPER = [name for name, b in BENCHES.items() if b.loader in ("tsv", "realx", "search")]   # what --bench all runs


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
    scorer: str = "vqa"
    problem: list = None     # WeMath: [its composite problem's ID, which part] ("2steps_1" .. "3steps_multi")


# ================================================================================================ loaders
def mcq_question(question, options, hint=None):
    """VLMEvalKit's multiple-choice prompt (ImageMCQDataset.build_prompt); letters only: the choices are drawn."""
    if not options or options == list(LETTERS[:len(options)]):
        return question
    return ((f"Hint: {hint}\n" if hint else "") + f"Question: {question}\nOptions:\n"
            + "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options))
            + "Please select the correct answer from the options above. \n")


def listed(value):
    """A list written as a Python / JSON literal in a TSV cell ("['a', 'b']"), or the value itself as a list."""
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.strip().startswith("["):
        return list(ast.literal_eval(value))
    return [value]


MME_CHOICES = ("Select the best answer to the above multiple-choice question based on the image. Respond with only "
               "the letter (A, B, C, D, or E) of the correct option. \nThe best answer is:")


def item_id(value):
    """A row's id as text; an id that is a list or an object makes a bad row (it names no one item)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"the id {str(value)[:60]!r} is not a string or an integer")
    return str(value)


def gold_answers(value):
    """A row's accepted answers as strings. An empty, missing or non-text answer makes a bad row (reported, skipped,
    counted): scored, a constant reply would count as right on it, and a judge would be asked about "None"."""
    answers = [a.strip() if isinstance(a, str) else a for a in listed(value)]
    if any(isinstance(a, bool) or not isinstance(a, (str, int, float)) or a != a for a in answers) or \
            all(a == "" for a in answers):   # a != a: NaN, pandas' empty cell
        raise ValueError(f"the answer {str(value)[:60]!r} is empty, missing or not text")
    return [str(a) for a in answers if a != ""]


def tsv_item(r, n, root, path, bench):
    """A VLMEvalKit TSV row: index, image (base64, or a list), question, A.. options, answer, category, hint.
    MME-RealWorld lists its options as "(A) text" in one column and asks in its own words (VLMEvalKit's
    MMERealWorld.build_prompt); WeMath rows name their composite problem (ID) and part (key)."""
    if r.get("multi-choice options"):
        options = [o[4:] for o in listed(r["multi-choice options"])]
        r = dict(r, question=f"{r['question']} The choices are listed below:\n"
                 + "\n".join(listed(r["multi-choice options"])) + "\n" + MME_CHOICES)
    else:
        options = [r[c] for c in LETTERS if r.get(c) not in (None, "", "nan")]
    answers = gold_answers(r["answer"])
    if options and answers[0] in options and not re.fullmatch(r"[A-H]", answers[0]):
        answers = [LETTERS[options.index(answers[0])]]   # the gold given as the option's text
    images = [base64.b64decode(b, validate=True) for b in listed(r["image"])]
    hint = r.get("hint") if r.get("hint") not in (None, "", "nan") else None
    question = r["question"] if r.get("multi-choice options") else mcq_question(r["question"], options, hint)
    return Item(item_id(r["index"]), question, answers, images,
                [r.get("category") or "all"], options, 0.05 if bench.scorer == "relaxed" else 1e-4,
                image_paths=[f"{os.path.basename(path)}#{r['index']}"] * len(images), scorer=bench.scorer,
                problem=[r["ID"], r["key"]] if r.get("key") and r.get("ID") else None)


def realx_item(r, n, root, path, bench):
    flags = [f for f in ("perception", "search", "reason") if int(r.get(f) or 0)]
    img = r["image"]["bytes"] if isinstance(r.get("image"), dict) else os.path.join(root, r["image"])
    answers = [a.strip() for a in gold_answers(r["answer"])[0].split(" or ")]
    return Item(item_id(r.get("id", n)), r["query"], answers, [img],
                flags + (["integration"] if len(flags) == 3 else []),
                data_source="search" if "search" in flags else "reason",
                image_paths=[r["image"] if isinstance(r["image"], str) else f"{path}#{n}"])


def search_item(r, n, root, path, bench):
    """A search-benchmark row: question (or query / prompt), answer (a string or a list) plus aliases, and an image
    (bytes, a {bytes} struct, base64, or a path)."""
    question = r.get("question") or r.get("query") or r.get("prompt")
    answers = gold_answers(r["answer"] if r.get("answer") is not None else r.get("answers"))
    answers += [str(a).strip() for key in ("aliases", "alias") if r.get(key) is not None for a in listed(r[key])
                if str(a).strip()]
    image = r.get("image") if r.get("image") is not None else r.get("image_path")
    image = image[0] if isinstance(image, list) else image
    if isinstance(image, dict):
        image = image["bytes"]
    elif isinstance(image, str) and not os.path.exists(os.path.join(root, image)):
        image = base64.b64decode(image, validate=True)
    elif isinstance(image, str):
        image = os.path.join(root, image)
    if not isinstance(question, str):
        raise ValueError("a search row needs a question")
    return Item(item_id(r.get("id", r.get("index", n))), question, list(dict.fromkeys(answers)), [image],
                [r.get("category") or "all"], data_source="search",
                image_paths=[image if isinstance(image, str) else f"{path}#{n}"])


def mathvision_item(r, n, root, path, bench):
    options = r.get("options") or []
    q = re.sub(r"<image\d+>", "", r["question"]).strip()
    return Item(item_id(r["id"]), mcq_question(q, options), gold_answers(r["answer"]), [os.path.join(root, r["image"])],
                [r.get("subject", "all")], options, image_paths=[r["image"]], scorer="math")


def toy_item(r, n, root, path, bench):
    return Item(item_id(r["id"]), r["question"], gold_answers(r["answer"]),
                [os.path.join(root, p) for p in r["images"]],
                [r["category"]] + ([r["wording"] + " wording"] if "wording" in r else []),
                data_source=r["data_source"], image_paths=r["images"])


ITEM_OF = {"tsv": tsv_item, "realx": realx_item, "search": search_item, "mathvision": mathvision_item,
           "toy": toy_item}


def file_rows(path):
    """(line or row number, row) of a JSONL, parquet or TSV benchmark file. In VLMEvalKit's TSVs an image cell of a
    few characters is the index of the row that holds the image (repeated images are stored once)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return [(i + 1, r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    if path.endswith(".tsv"):
        csv.field_size_limit(1 << 30)
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(enumerate(csv.DictReader(f, delimiter="\t"), 2))
        stored = {r.get("index"): r.get("image") for _, r in rows if len(r.get("image") or "") > 64}
        for _, r in rows:
            if len(r.get("image") or "") <= 64 and r.get("image") in stored:
                r["image"] = stored[r["image"]]
        return rows
    return M.jsonl_lines(path)


def load(bench, path):
    """The benchmark's items. Every row is checked here, its images opened once: a bad row (a missing field, an
    unreadable image) is reported with its line, skipped and counted, and the run goes on."""
    if not os.path.isfile(path):
        sys.exit(missing(bench, path) if not os.path.exists(path) else f"error: {path} is not a file")
    spec = BENCHES[bench]
    root = os.path.dirname(os.path.abspath(path))
    seen = set()

    def item(r, n):
        it = ITEM_OF[spec.loader](r, n, root, path, spec)
        M.refuse_special_text(it.question)
        if it.id in seen:   # counted twice, it would weigh twice; its predictions would overwrite each other
            raise ValueError(f"a second item with the id {it.id!r}")
        seen.add(it.id)
        for img in it.images:
            M.load_image(img, check_only=True)
        return it
    return M.kept_rows(file_rows(path), item, path, "items")


def missing(bench, path):
    return (f"error: {bench} data not found at {path}. Get it from {BENCHES[bench].source} on a machine with "
            f"internet access and put it there (or pass --data FILE).")


def default_path(bench):
    spec = BENCHES[bench]
    return os.path.join(HERE, spec.file) if spec.file.startswith("data/") else os.path.join(DATA_DIR, spec.file)


def md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(bench, path):
    """The benchmark file at `path`: there already, or fetched from where it is published (a VLMEvalKit TSV is
    checked against VLMEvalKit's MD5; a corrupt download is refused and removed). -> path, or None with the reason
    printed (offline, no public URL, a bad checksum)."""
    spec = BENCHES[bench]
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        if spec.hub:   # a hub dataset (RealX): its parquet file, through huggingface_hub (comes with transformers)
            from huggingface_hub import snapshot_download
            folder = snapshot_download(spec.hub, repo_type="dataset", allow_patterns=["*.parquet"],
                                       local_dir=path + ".hub")
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".parquet"))
            os.replace(found[0], path)
            return path
        if not spec.url:
            return None
        print(f"{bench}: downloading {spec.url}", file=sys.stderr)
        with requests.get(spec.url, stream=True, timeout=60) as r:
            r.raise_for_status()
            with open(path + ".part", "wb") as f:
                for block in r.iter_content(1 << 20):
                    f.write(block)
    except Exception as e:   # offline, a hub error, an HTTP error: say so, and the run goes on without it
        print(f"{missing(bench, path)} (fetching failed: {type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
        return None
    if spec.md5 and md5_of(path + ".part") != spec.md5:
        os.remove(path + ".part")
        print(f"error: {bench}: the download from {spec.url} does not match VLMEvalKit's MD5 {spec.md5}: refused",
              file=sys.stderr)
        return None
    os.replace(path + ".part", path)
    return path


def ocr_match(pred, gold, groups):
    """OCRBench's rule (VLMEvalKit): the reference, lower-cased, inside the answer; handwritten formulas compared
    without spaces and line breaks."""
    if "Handwritten Mathematical Expression Recognition" in groups:
        squeeze = lambda s: str(s).strip().replace("\n", "").replace(" ", "")
        return squeeze(gold) in squeeze(pred)
    plain = lambda s: str(s).lower().strip().replace("\n", " ")
    return plain(gold) in plain(pred)


CHOICE_PROMPT = ("You are given a multiple-choice question and an answer someone wrote to it. Reply with the letter "
                 "of the option the answer chose, or Z if it chose none of them. Reply with one letter only.\n\n"
                 "Question: {question}\nAnswer: {prediction}\nLetter:")


def judged_choice(judge, item, pred):
    """The option a free answer means, read by the judge (VLMEvalKit maps free text to an option the same way,
    with its own wording); a reply without a letter is a JudgeError, never a wrong answer."""
    reply = judge.chat([{"role": "user", "content": CHOICE_PROMPT.format(question=item.question, prediction=pred)}],
                       0.0, max_tokens=8)
    found = re.search(r"\b([A-HZ])\b", reply)
    if not found:
        raise G.JudgeError(f"the judge named no option: {reply[:100]!r}")
    return found.group(1)


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
    for r in M.kept_rows(M.jsonl_lines(path), lambda r, n: r, path, "rows") if os.path.exists(path) else []:
        rows[r["id"]] = r
    return rows


def wemath_strict(rows):
    """WeMath's headline, "Score (Strict)" (VLMEvalKit's wemath.py): each composite problem has 2 or 3 one-step parts
    and the multi-step question. Wrong multi-step with every part right: inadequate generalisation (IG); with a part
    wrong: insufficient knowledge (IK); right multi-step with a part wrong: rote memorisation (RM). Score =
    (N - 0.5 IG - RM - IK) / N over the N problems. VLMEvalKit divides by 525, the full set's count, and so credits
    a problem with a part missing; here such a problem (an infrastructure error, a --limit) is left out of N."""
    problems = defaultdict(dict)
    for r in rows:
        if "problem" in r and not r["infra_error"]:
            pid, key = r["problem"]
            steps, part = key.split("_")
            problems[(steps, pid)][part] = bool(r["correct"])
    ig = ik = rm = n = 0
    for (steps, _), parts in problems.items():
        subs = [parts.get(str(i)) for i in range(1, int(steps[0]) + 1)]
        if None in subs or "multi" not in parts:
            continue
        n += 1
        ig += all(subs) and not parts["multi"]
        ik += not all(subs) and not parts["multi"]
        rm += not all(subs) and parts["multi"]
    return 100 * (n - 0.5 * ig - rm - ik) / n if n else float("nan")


def protocol(args, bench, data, cfg):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:
        commit = ""
    settings = {k: v for k, v in cfg.items() if k not in ("prompt", "search_url")}
    return dict(bench=bench, data=os.path.abspath(data), model=args.model, commit=commit,
                weights=M.model_fingerprint(args.model), search_url=args.search_url,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), judge=args.judge_url and args.judge_model,
                prompt=dict(name=prompt_of(args, bench, data), system=cfg["prompt"].system,
                            user=cfg["prompt"].user),
                rollout=settings, scorer=BENCHES[bench].scorer, rules="option letter / text, numbers within "
                "tolerance, normalised text over the aliases (grpo.rule_score); then the judge on what they reject")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, help="a benchmark, a comma-separated list, or `all` (the paper's "
                    "22), in any case; one of: " + ", ".join(BENCHES))
    ap.add_argument("--model", default=M.DEFAULT_MODEL, help="hub name or folder of the model to evaluate")
    ap.add_argument("--data", help="the benchmark's file (one benchmark only; default: $DEEPEYES_DATA/FILE, "
                    "fetched when a public URL is known)")
    ap.add_argument("--out", help="output folder (default runs/eval/BENCH[-notools]; with several benchmarks, "
                    "one folder each inside it)")
    ap.add_argument("--no-tools", action="store_true", help="no tools: the direct prompt, tool calls refused")
    ap.add_argument("--limit", type=int, help="only the first N items of each benchmark")
    ap.add_argument("--batch", type=int, default=16, help="items per rollout batch")
    ap.add_argument("--max-turns", type=int, default=12, help="model turns per item (the paper: up to 11 tool "
                    "calls, then the answer)")
    ap.add_argument("--max-turn-tokens", type=int, default=20480, help="new tokens per model turn (the paper)")
    ap.add_argument("--max-response-tokens", type=int, default=32768, help="response budget, observations included")
    ap.add_argument("--max-pixels", type=int, default=M.RL_MAX_PIXELS, help="pixel cap of input images")
    ap.add_argument("--search-url", default=None, help="search backend (default $DEEPEYES_SEARCH_URL or local)")
    ap.add_argument("--prompt", help="agent, code, direct (the original's, data/prompts/) or a system prompt file; "
                    "default: the paper's for each benchmark (code for the VLMEvalKit sets, agent for RealX and the "
                    "search sets), direct with --no-tools")
    ap.add_argument("--judge-url", default=os.environ.get("JUDGE_URL"), help="OpenAI-compatible judge base URL "
                    "(default $JUDGE_URL; none: rules only)")
    ap.add_argument("--judge-model", default=os.environ.get("JUDGE_MODEL", "Qwen2.5-72B-Instruct"), help="judge model")
    ap.add_argument("--overwrite", action="store_true", help="discard the predictions already in --out")
    args = ap.parse_args(argv)
    M.check_args(ap, args, positive=("limit", "batch", "max_turns", "max_turn_tokens", "max_response_tokens",
                                     "max_pixels"))
    by_name = {b.lower(): b for b in BENCHES}   # names are matched without regard to case: realx is RealX
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
    """--prompt, else the paper's for the benchmark; the miniature's own prompt lies beside its data."""
    if args.prompt or args.no_tools:
        return args.prompt or "direct"
    return BENCHES[bench].prompt or os.path.join(os.path.dirname(data), "world_system_prompt.txt")


def rollout_config(args, prompt):
    """Greedy; image_i in the sandbox is the resized image the model sees (as the original's evaluation)."""
    return dict(max_turns=args.max_turns, max_turn_tokens=args.max_turn_tokens, tools_on=not args.no_tools,
                max_response_tokens=args.max_response_tokens, max_pixels=args.max_pixels, search_url=args.search_url,
                prompt=R.load_prompt(prompt), sandbox_sees="model")


def claim_output(out, proto, overwrite):
    """An output folder holds one protocol's predictions: a rerun of the same protocol resumes, another model,
    prompt, benchmark or setting is refused (its predictions would be reported as this run's)."""
    path = os.path.join(out, "protocol.json")
    # the weights by their content (a checkpoint is replaced in place by every save); not the search URL: items
    # that met a search outage are retried against a new one
    keys = ("bench", "data", "model", "weights", "judge", "prompt", "rollout")
    if os.path.exists(path) and not overwrite:
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            sys.exit(f"error: {path} is unreadable: pass another --out, or --overwrite to discard its predictions")
        differ = [k for k in keys if old.get(k) != proto[k]]
        if differ:
            sys.exit(f"error: {out} holds predictions of another run (different {', '.join(differ)}): pass another "
                     "--out, or --overwrite to discard them")
    if overwrite:
        for name in ("predictions.jsonl", "protocol.json"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    M.write_atomic(path, json.dumps(proto, indent=1))


def print_table(results):
    """One row a benchmark: our number beside the paper's (OCRBench as a count out of 1000, as the paper prints)."""
    cell = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
    print(f"\n{'benchmark':22s} {'ours':>7s} {'DeepEyesV2':>11s} {'Qwen2.5-VL':>11s} {'items':>6s} "
          f"{'tools/item':>10s} {'turns':>6s}")
    for name, r in results.items():
        paper = BENCHES[name].paper
        if isinstance(r, str):
            print(f"{name:22s} {'-':>7s} {cell(paper[0]):>11s} {cell(paper[1]):>11s}  {r}")
            continue
        ours = r["metric"][1] if "metric" in r else r["accuracy"] * (10 if BENCHES[name].scorer == "ocr" else 1)
        print(f"{name:22s} {ours:7.1f} {cell(paper[0]):>11s} {cell(paper[1]):>11s} {r['scored']:6d} "
              f"{r['tool_calls_per_item']:10.2f} {r['mean_turns']:6.2f}")


# ================================================================================================ the report
REPORT_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
.card{border:1px solid #bbb;border-radius:6px;margin:1.2em 0;padding:.6em 1em}.card.right{border-left:6px solid #2a2}
.card.wrong{border-left:6px solid #c33}.card.infra{border-left:6px solid #888}pre{white-space:pre-wrap;margin:.3em 0;
padding:.4em;background:#f6f6f6;border-radius:4px;overflow-wrap:anywhere}p{overflow-wrap:anywhere}.think{color:#666;font-style:italic}.code{background:#eef3ff}
.call{background:#fff4e0}.answer{font-weight:bold;background:#e8f7e8}.obs{background:#fafafa;border-left:3px solid #ddd}
img{max-width:320px;max-height:320px;border:1px solid #ccc;margin:3px}.turn{margin:.5em 0}.role{font-size:12px;
color:#888;text-transform:uppercase}"""


REPORT_FILTER = """function show(v){for(const c of document.querySelectorAll('.card')){const k=c.dataset;
c.style.display=(v=='all'||(v=='right'&&k.verdict=='right')||(v=='wrong'&&k.verdict=='wrong')||
k.tools.split(' ').includes(v))?'':'none'}}"""


TAGGED = re.compile(r"(<think>.*?</think>|<code>.*?</code>|<tool_call>.*?</tool_call>|<answer>.*?</answer>)", re.S)


def report(run_dir, data_root=None):
    """run_dir/report.html: one self-contained page (images embedded, no server, no CDN) with the summary table and
    one card per item: question and input images, every turn in order (thinking, code, tool output and its images,
    search results), the answer, the gold answer and the verdict. Everything the model or a tool wrote is escaped."""
    import html
    path = os.path.join(run_dir, "predictions.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: no predictions.jsonl in {run_dir}: run eval.py first")
    rows = list(latest_rows(path).values())
    proto = json.load(open(os.path.join(run_dir, "protocol.json"))) if os.path.exists(
        os.path.join(run_dir, "protocol.json")) else {}
    data_root = data_root or os.path.dirname(proto.get("data", ""))   # where input images are named from
    summary = summarize(rows, proto.get("bench", os.path.basename(run_dir.rstrip("/"))), show=False)
    run = [f"{k} {v}" for k, v in (("model", proto.get("model")), ("prompt", proto.get("prompt", {}).get("name"))) if v]
    esc = html.escape

    def image_tag(name):
        for where in (os.path.join(run_dir, name), os.path.join(data_root, name)):
            if os.path.isfile(where):
                return f'<img src="data:image/png;base64,{base64.b64encode(open(where, "rb").read()).decode()}">'
        return f"<span>[image {esc(name)} not found]</span>"

    def with_images(text, images, css):   # text with "<image>" marks -> escaped blocks and the images in order
        parts = text.split("<image>")
        out = [f'<pre class="{css}">{esc(p)}</pre>' if p.strip() else "" for p in parts[:1]]
        for p in parts[1:]:
            out.append(image_tag(images.pop(0)) if images else "")
            out.append(f'<pre class="{css}">{esc(p)}</pre>' if p.strip() else "")
        return "".join(out)

    def model_turn(text, images):
        css = lambda part: next((c for tag, c in (("<think>", "think"), ("<code>", "code"), ("<tool_call>", "call"),
                                                  ("<answer>", "answer")) if part.startswith(tag)), "plain")
        return "".join(with_images(part, images, css(part)) for part in TAGGED.split(text) if part.strip())

    cards = []
    for r in rows:
        images = list(r.get("images", []))
        turns = [t.split("\n", 1) for t in r["trajectory"].split("<|im_start|>")[1:]]
        body = []
        for k, (role, text) in enumerate(turns):
            text = text.replace("<|im_end|>", "").rstrip("\n")
            if role == "system":
                body.append(f"<details><summary class=role>system prompt</summary><pre>{esc(text)}</pre></details>")
            elif role == "user":
                label = "question" if k <= 1 else "tool output"
                body.append(f'<div class=turn><div class=role>{label}</div>'
                            f'{with_images(text, images, "plain" if k <= 1 else "obs")}</div>')
            else:
                body.append(f'<div class=turn><div class=role>model</div>{model_turn(text, images)}</div>')
        verdict = "infra" if r["infra_error"] else "right" if r["correct"] else "wrong"
        tools = " ".join(k for k, v in r["calls"].items() if v)
        cards.append(f'<div class="card {verdict}" data-verdict="{verdict}" data-tools="{esc(tools)}">'
                     f'<h3>{esc(str(r["id"]))} &middot; {verdict}</h3>{"".join(body)}'
                     f'<p><b>answer:</b> {esc(str(r["prediction"]))} &nbsp; <b>gold:</b> '
                     f'{esc(" | ".join(map(str, r["answers"])))} &nbsp; <b>finish:</b> {esc(r["finish"])} '
                     f'&nbsp; <b>tools:</b> {esc(tools or "none")}</p></div>')
    groups = "".join(f"<tr><td style=text-align:left>{esc(g)}</td><td>{v['n']}</td><td>{v['accuracy']:.1f}</td></tr>"
                     for g, v in summary["groups"].items())
    rates = ", ".join(f"{esc(k)} {v:.0f}%" for k, v in summary["tool_rate"].items()) or "none"
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{esc(summary['label'])}</title>"
            f"<style>{REPORT_STYLE}</style><script>{REPORT_FILTER}</script></head><body>"
            f"<h1>{esc(summary['label'])}</h1><p>{esc(', '.join(run) + '; ' if run else '')}{summary['scored']} "
            f"items scored, "
            f"{summary['infra_errors']} infrastructure errors</p><table><tr><th>group</th><th>items</th>"
            f"<th>accuracy</th></tr><tr><td style=text-align:left>overall</td><td>{summary['scored']}</td>"
            f"<td>{summary['accuracy']:.1f}</td></tr>{groups}</table><p>tool-call rate: {rates}; calls per item "
            f"{summary['tool_calls_per_item']:.2f}; mean turns {summary['mean_turns']:.2f}</p>"
            f"<p>show <select onchange=show(this.value)><option value=all>all</option><option value=wrong>wrong"
            f"</option><option value=right>right</option><option value=code>used code</option><option "
            f"value=search>used search</option><option value=image_search>used image search</option></select></p>"
            f"{''.join(cards)}</body></html>")
    out = os.path.join(run_dir, "report.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {out} ({len(rows)} items)")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        ap = argparse.ArgumentParser(description="write RUN_DIR/report.html: every item's turns, code, tool "
                                     "outputs and images, in one offline page")
        ap.add_argument("run_dir", help="an eval output folder (predictions.jsonl, protocol.json)")
        return report(ap.parse_args(argv[1:]).run_dir)
    args = parse_args(argv)
    model = processor = None
    results = {}
    judge = G.LLMJudge(args.judge_url, args.judge_model) if args.judge_url else None
    for bench in args.benches:
        data = args.data or fetch(bench, default_path(bench)) or default_path(bench)
        if not os.path.exists(data):   # one benchmark: stop and say where the file comes from; several: go on
            if len(args.benches) == 1:
                sys.exit(missing(bench, data))
            results[bench] = f"not run: no file at {data} ({BENCHES[bench].source})"
            continue
        items = load(bench, data)[:args.limit]
        if not items:   # an empty or wholly bad file: no number, rather than a NaN that looks like one
            if len(args.benches) == 1:
                sys.exit(f"error: no usable items in {data}")
            results[bench] = f"not run: no usable items in {data}"
            continue
        cfg = rollout_config(args, prompt_of(args, bench, data))
        folder = bench + ("-notools" if args.no_tools else "")
        out = (os.path.join(args.out, folder) if len(args.benches) > 1 else args.out) if args.out else \
            os.path.join("runs", "eval", folder)
        claim_output(out, protocol(args, bench, data, cfg), args.overwrite)
        if model is None:
            model, processor = M.load_model(args.model)
        rows = evaluate(model, processor, items, out, args.batch, judge, **cfg)
        name = "RealX (public 194)" if bench == "RealX" and len(items) == 194 else bench
        results[bench] = summarize(rows, f"{name}, {len(items)} items" + (", no tools" if args.no_tools else ""))
    print_table(results)
    print(json.dumps(results))
    return results[args.benches[0]] if len(args.benches) == 1 else results


if __name__ == "__main__":
    main()
