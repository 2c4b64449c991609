"""support/benchmarks.py -- the paper's 22 benchmarks: where each file comes from, how its rows are read.

eval.py runs items through the agent loop and scores them; this module is everything about the files: the registry
(`BENCHES`: loader, scorer, the paper's prompt set, file name, public source, URL and MD5 as VLMEvalKit lists them,
the paper's numbers), one loader per published format (VLMEvalKit TSV with base64 images, RealX parquet, the search
sets' JSONL / parquet, MATH-Vision's JSONL, the miniature's world), checked downloads, and WeMath's strict score.
Every row is checked when the file loads: a bad one (a missing field, an unreadable image, an empty answer, an id
that repeats) is reported with its line, skipped and counted, and the run goes on.
"""
import ast
import base64
import csv
import hashlib
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import requests

import model as M
from support import reading

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
DATA_DIR = os.environ.get("DEEPEYES_DATA", os.path.join(os.path.expanduser("~"), ".cache", "deepeyesv2", "benchmarks"))
LETTERS = "ABCDEFGH"
VLMEVAL = "https://opencompass.openxlab.space/utils/VLMEval/"
HF = "https://huggingface.co/datasets/"


@dataclass
class Bench:
    loader: str                 # tsv (VLMEvalKit) | realx | search | mathvision (MATH-V jsonl) | toy
    scorer: str                 # the fork's (support/fork.py), or ocr, or math / vqa: rules, then the judge
    prompt: str                 # the paper's prompt set for it
    file: str                   # its file under $DEEPEYES_DATA (or in this repository: data/...)
    source: str                 # where it is published
    url: str = ""               # fetched from here when missing ("" = by hand)
    md5: str = ""               # VLMEvalKit's checksum of that file ("" = none known)
    paper: tuple = (None, None)   # the paper's DeepEyesV2 and Qwen2.5-VL-7B numbers (None: not reported)
    hub: str = ""               # a hub dataset holding the file (RealX)
    ask: str = "plain"          # how the authors' fork words a row's question (`fork_question`)


# How the authors' fork words each VLMEvalKit set's questions: its dataset class's build_prompt (ImageMCQDataset:
# mcq; WeMath, TreeBench, MMERealWorld, Dynamath their own; ImageVQADataset: vqa). The rest ask the question as is.
ASK = {"VStarBench": "mcq", "HRBench4K": "mcq", "HRBench8K": "mcq", "SEEDBench2_Plus": "mcq", "WeMath": "wemath",
       "TreeBench": "tree", "MME-RealWorld": "mme", "MME-RealWorld-Lite": "mme", "ChartQA_TEST": "vqa",
       "DynaMath": "dynamath"}


def vlmevalkit(name, scorer, paper=(None, None), url=None, md5=""):
    """A VLMEvalKit benchmark: one TSV, the code prompt; url None = VLMEvalKit's usual address."""
    return Bench("tsv", scorer, "code", f"{name}.tsv", f"VLMEvalKit's {name}.tsv (its dataset code lists the URL)",
                 VLMEVAL + f"{name}.tsv" if url is None else url, md5, paper, ask=ASK.get(name, "plain"))


def search_set(name, source, paper):
    return Bench("search", "vqa", "agent", f"{name}.jsonl", source, paper=(paper, None))


BENCHES = {
    "VStarBench": vlmevalkit("VStarBench", "mcq", (81.8, 78.5), md5="b18854d7075574be06b631cd5f7d2d6a",
                             url=HF + "xjtupanda/VStar_Bench/resolve/main/VStarBench.tsv"),
    "HRBench4K": vlmevalkit("HRBench4K", "mcq", (77.9, 71.6), HF + "DreamMr/HR-Bench/resolve/main/hr_bench_4k.tsv",
                            "f6b041b03d49543494b8a56d2e35be65"),
    "HRBench8K": vlmevalkit("HRBench8K", "mcq", (73.8, 67.9), HF + "DreamMr/HR-Bench/resolve/main/hr_bench_8k.tsv",
                            "274c9c7f89329b804a4723178a00219c"),
    # VLMEvalKit builds MME-RealWorld.tsv from the JSON of hub dataset yifanzhang114/MME-RealWorld-Base64: no one URL
    "MME-RealWorld": vlmevalkit("MME-RealWorld", "letter", (64.9, 57.3), "", "271c33ec814c39533c467ec6fb8a6f36"),
    "MME-RealWorld-Lite": vlmevalkit("MME-RealWorld-Lite", "letter", md5="4c17057d7d3b6c4a0d4397c3dae0881c",
                                     url=HF + "yifanzhang114/MME-RealWorld-Base64/resolve/main/mme_realworld_lite.tsv"),
    "TreeBench": vlmevalkit("TreeBench", "letter", url=HF + "HaochenWang/TreeBench/resolve/main/TreeBench.tsv"),
    "SEEDBench2_Plus": vlmevalkit("SEEDBench2_Plus", "mcq", url="https://opencompass.openxlab.space/utils/benchmarks/"
                                  "SEEDBench/SEEDBench2_Plus.tsv", md5="e32d3216dc4f452b0fe497a52015d1fd"),
    "OCRBench": vlmevalkit("OCRBench", "ocr", (882, 864), md5="e953d98a987cc6e26ef717b61260b778"),
    "CharXiv_descriptive_val": vlmevalkit("CharXiv_descriptive_val", "charxiv", md5="e165037032f169a59dd09ea5d7ad3073"),
    "CharXiv_reasoning_val": vlmevalkit("CharXiv_reasoning_val", "charxiv", md5="98eeff269b40726982627b19338ccd45"),
    "ChartQA_TEST": vlmevalkit("ChartQA_TEST", "relaxed", (88.4, 86.2), md5="c902e0aa9be5582a7aad6dcf52734b42"),
    "MathVista_MINI": vlmevalkit("MathVista_MINI", "mathvista", (71.9, 68.3), md5="f199b98e178e5a2a20e7048f5dcb0464"),
    "MathVision": vlmevalkit("MathVision", "mathvision", (28.9, 25.6), md5="93f6de14f7916e598aa1b7165589831e"),
    "MathVerse_MINI": vlmevalkit("MathVerse_MINI", "mathverse", (52.7, 45.6), "http://opencompass.openxlab.space/utils/"
                                 "benchmarks/MathVerse/MathVerse_MINIV.tsv", "5017caca32b7fa110c350a1bea861b65"),
    "WeMath": vlmevalkit("WeMath", "wemath", md5="b5e969a075f01290a542411fb7766388"),   # reported: Score (Strict)
    "DynaMath": vlmevalkit("DynaMath", "dynamath", md5="b8425ad9a7114571fc9366e013699494"),
    "LogicVista": vlmevalkit("LogicVista", "logicvista", md5="41c5d33adf33765c399e0e6ae588c061"),
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
    asked: str = ""          # the row's own question, as the fork's judge prompts quote it
    row: dict = field(default_factory=dict)   # the row's other fields (its image aside): the fork's scorers read them


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
    """A VLMEvalKit TSV row: index, image (base64, or a list), question, A.. options, answer, category, hint; the
    question worded as the authors' fork words it (`fork_question`). MME-RealWorld-Lite's file lists its options as
    one Python list of "(A) text" (the fork reads it so); WeMath rows name their composite problem (ID) and part."""
    options = [r[c] for c in LETTERS if r.get(c) not in (None, "", "nan")]
    choices = r.get("multi-choice options")
    if bench.ask == "mme" and str(choices).lstrip().startswith("["):
        options = [o[4:] for o in listed(choices)]
        choices = "The choices are listed below:\n" + "\n".join(listed(choices))
    answers = gold_answers(r["answer"])
    if options and answers[0] in options and not re.fullmatch(r"[A-H]", answers[0]):
        answers = [LETTERS[options.index(answers[0])]]   # the gold given as the option's text
    images = [base64.b64decode(b, validate=True) for b in listed(r["image"])]
    hint = r.get("hint") if r.get("hint") not in (None, "", "nan") else None
    return Item(item_id(r["index"]), fork_question(r, bench.ask, options, hint, choices), answers, images,
                [r.get("category") or "all"], options, 0.05 if bench.scorer == "relaxed" else 1e-4,
                image_paths=[f"{os.path.basename(path)}#{r['index']}"] * len(images), scorer=bench.scorer,
                problem=[r["ID"], r["key"]] if r.get("key") and r.get("ID") else None, asked=r["question"],
                row={k: v for k, v in r.items() if k != "image"})


DYNAMATH_GUIDE = ("\n## Answer Instruction Please provide an answer to the question outlined above. Your response "
                  "should adhere to the following JSON format, which includes two keys: 'solution' and 'short answer'. "
                  "The 'solution' key can contain detailed steps needed to solve the question, and the 'short answer' "
                  "key should provide a concise response. {}\n\nExample of expected JSON response format:\n\n{{\n"
                  '    "solution": "[Detailed step-by-step explanation]",\n    "short answer": "[Concise Answer]"\n}}')
DYNAMATH_INST = {"multiple choice": "Provide the corresponing choice option in the 'short answer' key, such as 'A', "
                                    "'B', 'C', or 'D'.",   # (sic)
                 "float": "Format the answer as a three-digit floating-point number and provide it in the 'short "
                          "answer' key."}


def fork_question(r, ask, options, hint, choices):
    """The text the authors' fork sends with a row's images (evaluation/VLMEvalKit/vlmeval/dataset: ImageMCQDataset,
    WeMath, TreeBench, MMERealWorld, ImageVQADataset, Dynamath .build_prompt; every other set: the question)."""
    q = r["question"]
    if ask == "mme":
        return f"{q} {choices}\n{MME_CHOICES}"
    if ask == "vqa":
        return q + "\nAnswer the question using a single word or phrase."
    if ask == "dynamath":
        return f"## Question\n {q}" + DYNAMATH_GUIDE.format(DYNAMATH_INST.get(r.get("answer_type"), "Float numbers "
                                                          "in the answer should be formatted as three-digit "
                                                          "floating-point numbers."))
    if ask == "plain":
        return q
    head = (f"Hint: {hint}\n" if hint else "") + f"Question: {q}\n"
    if ask == "tree":
        return head + ("" if r.get("category") == "Perception/OCR" else f"\nOptions:\n{choices}"
                       "Answer with the correct option's letter directly. \n")
    listing = "Options:\n" + "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options)) if options else ""
    return head + listing + ("Please select the correct answer from the options above. \n"
                             if options and ask == "mcq" else "")


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
    return reading.jsonl_lines(path)


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
    return reading.kept_rows(file_rows(path), item, path, "items")


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


