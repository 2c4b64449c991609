"""support/fork.py -- evaluation as the authors ran it: their VLMEvalKit fork's agent loop, point by point.

The paper's numbers for the VLMEvalKit sets come from the authors' fork of VLMEvalKit (Visual-Agent/DeepEyesV2,
evaluation/VLMEvalKit: vlmeval/api/vllm_api.py, vlmeval/api/agent_utils.py, vlmeval/smp/vlm.py). eval.py runs those
sets through the one agent loop (rollout.py) with the fork's three ways plugged in, which a first reading can skip:
  - `as_the_fork_sends`: a benchmark image as the fork sent it (JPEG files, a BILINEAR smart resize, a short side under
    100 px enlarged);
  - `read_turn`: a model turn as the fork's loop read it (an "<answer>" anywhere ends it; else the first <code> block
    runs, inside its first ```python fence if it has one);
  - `observe`: a code result as the fork's loop sent it back: a user message "Code execution result: ... Images:\n"
    with the code's images that are not white (BILINEAR smart resize, JPEG), and no "<think>" pre-filled after it;
  - `score`: each VLMEvalKit set scored as the fork meant it (`SCORING`, one function a scorer: `choice` for multiple
    choice, `letter`, `chartqa`, `mathvista`, `mathverse`, `mathvision`, `dynamath`, `logicvista`, `charxiv`), its
    judge prompts as it wrote them; where its code was plainly wrong, what it meant (each bug named in the README);
  - `as_the_fork_did`: the verdict its buggy code gave where no judge was needed, so eval can count the difference.
RL keeps the original's RL environment (tools.parse_action, rollout.OBS_SUFFIX): the two differ, as they did there.
"""
import ast
import io
import json
import math
import re

import numpy as np
from PIL import Image

import model as M
import tools
from support.scoring import JudgeError, read_prompt, rule_score

SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"   # the chat template's generation prompt: no <think> pre-filled


def jpeg(img):
    """The image after a round trip through a JPEG file (PIL's defaults: quality 75, 4:2:0), as the fork saved it."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def smart_resize(img):
    """The fork's maybe_resize_image_v2: sides to multiples of 28 within 4..16384 patches, BILINEAR."""
    return M.prepare_image(img, min_pixels=4 * 28 * 28, resample=Image.BILINEAR)


def as_the_fork_sends(img):
    """A VLMEvalKit benchmark's image as the fork sent it to the model: written as a JPEG file (the dataset's image),
    smart-resized and written as JPEG again (the copy its sandbox opens as image_1), then encoded as JPEG once more to
    send, enlarged first by 100 / its short side when that is under 100 px (VLMEVAL_MIN_IMAGE_EDGE; PIL's default
    BICUBIC). The model's processor then resizes it as any image."""
    img = jpeg(smart_resize(jpeg(img)))
    if min(img.size) < 100:
        f = 100 / min(img.size)
        img = img.resize((int(img.width * f), int(img.height * f)))
    return jpeg(img)


def read_turn(text, offered=("code",)):
    """A model turn as the fork's loop read it (vllm_api.generate_inner_agent): "<answer>" anywhere ends the episode;
    else, "<code>" anywhere runs the text after the first <code> up to the next </code> (or the end), cut to its first
    ```python ... ``` when it holds one, stripped; else nothing runs (the fork asks again, and greedy decoding gives
    the same turn: the episode ends)."""
    if "<answer>" in text:
        return tools.Action("answer", tools.extract_answer(text) or "")
    if "<code>" not in text or "code" not in offered:
        return tools.Action("none")
    code = text.split("<code>")[1].split("</code>")[0].strip()
    if "```python" in code:
        code = code.split("```python")[1].strip()
    return tools.Action("code", code.split("```")[0].strip())


def white(img):
    """The fork's check_white_image: every channel of every pixel at least 250 (such an image is not sent)."""
    return bool((np.asarray(img) >= 250).all())


def observe(text, images):
    """(observation text, images) as rollout made them -> the fork's (text, images, what follows). A code result is
    sent as the fork's return_template ("... stderr:\n```\n{stderr}\n```\n\nImages:\n", "Images:" always) with its
    images that are not white, each smart-resized and JPEG-encoded; then the assistant turn opens without <think>."""
    if text.startswith("Code execution result:"):
        kept = [jpeg(smart_resize(im)) for im in images if not white(im)]
        head = text.rpartition("\n\nImages:\n")[0] if images else text
        return head + "\n\nImages:\n" + tools.IMAGE_SLOT * len(kept), kept, SUFFIX
    return text, images, SUFFIX


PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
            "The correct option is", "Best answer:", "Best option:")


def option_letter(answer):
    """The option letter (A-E) of an MME-RealWorld or TreeBench answer, or "" for none, as the fork's scorer meant it
    (utils/multiple_choice.py, extract_characters_regex): its answer phrases removed, then the first capital A-E
    standing alone. The fork took the first capital A-E anywhere, so "Answer: C" read as A and "Blue" as B; a
    missing comma in its phrase list kept "Best answer: E" (read as B); an empty answer read as A (the empty string
    is inside "(a)"). A lone lower-case letter ("c") counts, as it did."""
    s = answer.strip()
    if re.fullmatch(r"\(?[A-Ea-e]\)?\.?", s):
        return s.strip("().").upper()
    for prefix in PREFIXES:
        s = s.replace(prefix, "")
    found = re.search(r"\b[A-E]\b", s)
    return found[0] if found else ""


def relaxed(pred, gold):
    """ChartQA's check as the fork meant it (utils/vqa_eval.py, relaxed_correctness_judge): a number within 5% of a
    non-zero numeric reference ("40%" reads 0.4) is right; else an answer equal to the reference, case aside, is right;
    else None: the judge decides. The fork passed answer and reference the other way round (so the 5% was of the
    answer, and a zero answer went to text comparison): here as its docstring says."""
    def number(text):
        try:
            return float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            return None
    pred, gold = str(pred).strip(), str(gold)
    if number(pred) is not None and number(gold):
        return abs(number(pred) - number(gold)) / abs(number(gold)) <= 0.05
    return True if pred.lower() == gold.lower() else None


def can_infer(answer, choices):
    """VLMEvalKit's can_infer (vlmeval/utils/matching_util.py), which the fork kept: the one option letter standing
    alone among the answer's last five words (punctuation as spaces), "Z" for a lone Z or a refusal, else the one
    option whose text the answer holds (an answer over twice the options' length: none) -> letter or ""."""
    if any(r in answer for r in ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                                 "I'm sorry, but without the image provided", "Cannot determine the answer")):
        return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", answer).split()
    named = [c for c in choices if c in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and "Z" in words:
        return "Z"
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return ""
    held = [c for c, text in choices.items() if str(text).lower() in answer.lower()]
    return held[0] if len(held) == 1 else ""


MATCH_PROMPT = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice question. You "
    "are provided with a question, several options, and an answer, and you need to find which option is most similar "
    "to the answer. If the meaning of all options are significantly different from the answer, output Z. Your should "
    "output a single uppercase character in A, B, C, D (if they are valid options), and Z. \nExample 1: \nQuestion: "
    "What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\nAnswer: a cute teddy bear\n"
    "Your output: A\nExample 2: \nQuestion: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat "
    "D. dog\nAnswer: Spider\nYour output: Z\nExample 3: \nQuestion: {}?\nOptions: {}\nAnswer: {}\nYour output: ")


WEMATH_MATCH_PROMPT = read_prompt("wemath_match_prompt.txt")   # its own build_prompt_wemath
WEMATH_COT_FORMAT = ("Regarding the format, please answer following the template below, and be sure to include two <> "
                     "symbols:\n<Thought process>: <<your thought process>> <Answer>: <<your option>>")


def choice(pred, item, judge):
    """The multiple-choice verdict as the fork's mcq_vanilla_eval reached it: can_infer on the answer; else the judge
    matches it to an option (MATCH_PROMPT, one user message at temperature 0, up to 3 tries); an answer matched to
    no option (Z) is then judged against the reference with the fork's verify prompt. The fork drew a random option
    when 3 tries named none: here that is a JudgeError (counted, retried), never a lucky guess. -> 1.0 / 0.0."""
    choices = dict(zip("ABCDEFGH", item.options))
    picked = can_infer(pred, choices)
    if not picked and judge is not None:
        listing = "There are several options: \n" + "".join(f"{c}. {t}\n" for c, t in choices.items())
        question = item.asked or item.question
        asking = MATCH_PROMPT.format(question, listing, pred) if item.scorer == "mcq" else \
            WEMATH_MATCH_PROMPT.format(question.replace(WEMATH_COT_FORMAT, ""), listing, pred)
        for _ in range(3):
            picked = can_infer(judge.chat([{"role": "user", "content": asking}], 0.0), choices)
            if picked:
                break
        else:
            raise JudgeError("the judge matched the answer to no option, 3 times")
    if picked == "Z" and judge is not None:
        return judge.verify(item.asked or item.question, item.answers[0], pred)
    return float(picked == item.answers[0])


MATHVISTA_PROMPT = read_prompt("mathvista_extract_prompt.txt")


def mathvista(pred, item, judge):
    """MathVista as the fork scored it (utils/mathvista.py): the answer checked as it is (a choice by can_infer
    against answer_option, an integer or a float by its value, else as text); if that fails, the judge extracts the
    answer (the five-example prompt, one user message, at most 128 tokens) and the extraction is checked. As meant
    where the fork erred: a text or list answer is compared as text (it compared the string "None", so such answers
    were never right)."""
    row = item.row

    def right(answer):
        try:
            if row.get("question_type") == "multi_choice":
                options = dict(zip("ABCDEFGH", ast.literal_eval(row["choices"])))
                return can_infer(answer, options) == row.get("answer_option")
            if row.get("answer_type") in ("integer", "float"):
                cast = int if row["answer_type"] == "integer" else float
                return cast(answer) == cast(row["answer"])
            return str(answer) == str(row["answer"])
        except (ValueError, SyntaxError, TypeError):
            return False
    if right(pred) or judge is None:
        return float(right(pred))
    prompt = MATHVISTA_PROMPT + row["question"] + "\nModel respone: " + pred + "Extracted answer:"
    return float(right(judge.chat([{"role": "user", "content": prompt}], 0.0, max_tokens=128)))


def dynamath_short(answer, kind):
    """The fork's parse_answer: a float (a leading number, "π" read as a factor), one option letter, or the text."""
    if kind == "float":
        try:
            head = answer.split(" ")[0]
            return True, float(head.split("\u03c0")[0]) * (math.pi if "\u03c0" in head else 1)
        except (ValueError, AttributeError):
            return False, None
    if kind == "multiple choice":
        named = [c for c in "ABCDE" if c in str(answer).upper()]
        return (True, answer.upper()) if len(answer) == 1 else (True, named[0]) if len(named) == 1 else (False, None)
    return True, answer


def dynamath(pred, item, judge):
    """DynaMath as the fork scored it (dynamath.py, DynaMath_auxeval): the "short answer" of the JSON the prompt asked
    for (the text from its first "{" to its last "}", backslashes dropped); if there is none, the whole answer; if
    that does not parse either, the judge's reply to "Free-form answer: ...\nInstruction: ..." (one user message).
    A float within 0.001 is right; a letter equal to the reference (unparsed: the reference among its first three
    characters); a text inside the reference, as the fork's, but not an empty one (the fork counted "" as right)."""
    kind, gold = item.row.get("answer_type"), str(item.row.get("answer", item.answers[0]))
    text = pred[pred.find("{"):pred.rfind("}") + 1] if 0 <= pred.find("{") < pred.rfind("}") else pred
    text = text.replace("\\", "")
    try:
        ok, short = dynamath_short(json.loads(text, strict=False)["short answer"], kind)
        assert ok
    except (ValueError, TypeError, KeyError, AssertionError):
        ok, short = dynamath_short(text, kind)
        if not ok and judge is not None:
            ask = {"multiple choice": "Output the corresponing choice option, such as 'A', 'B', 'C', 'D', in a "
                                      "single line.",
                   "float": "Output a three-digit floating-point number in a single line."}.get(
                kind, "Output a short answer in a single line. Any float numbers in the answer should be formatted "
                      "as three-digit floating-point numbers.")
            ok, short = dynamath_short(judge.chat([{"role": "user", "content": f"Free-form answer: {text}\n"
                                                                                 f"Instruction: {ask}"}], 0.0), kind)
    if kind == "float":
        return float(ok and abs(short - float(gold)) <= 0.001)
    if kind == "multiple choice":
        return float(short == gold if ok else gold in text[:3].upper())
    return float(bool(str(short).strip()) and str(short).lower() in gold.lower())


LOGICVISTA_PROMPT = read_prompt("logicvista_extract_prompt.txt")


def logicvista(pred, item, judge):
    """LogicVista as the fork scored it (utils/logicvista.py): the letters the answer chose, extracted by the judge
    (its prompt, one user message, at most 128 tokens, up to 5 tries at temperature 0, 0.5, ... until the reply is
    capital letters only), compared as a set with the reference ("A, C"). An answer that is capital letters already
    is read without the judge (the fork asked it anyway); 5 replies without letters are a JudgeError (the fork: 0)."""
    gold = "".join(sorted(str(item.row.get("answer", item.answers[0])).replace(", ", "").lower()))
    letters = re.sub(r"[\s,]", "", pred)
    if letters.isalpha() and letters.isupper():
        return float("".join(sorted(letters.lower())) == gold)
    if judge is None:
        return 0.0
    prompt = (LOGICVISTA_PROMPT + (item.asked or item.question) + "\n<end>\nAnswer: <start>\n" + pred
              + "\n<end>\nYour output: ")
    for attempt in range(5):
        reply = judge.chat([{"role": "user", "content": prompt}], 0.5 * attempt, max_tokens=128)
        if reply.isalpha() and reply.isupper():
            return float("".join(sorted(reply.lower())) == gold)
    raise JudgeError("the judge named no letters, 5 times")


def charxiv(pred, item, judge):
    """CharXiv as the fork scored it (charxiv.py, auxeval): the row's own grading_query with the answer in place of
    {PREDICTION}, one user message (temperature 0, top_p 1, seed 42, at most 256 tokens), asked up to 10 times until
    the reply parses as JSON; its "score" is the verdict (JSON without "score" and "extract_answer": 0, as the fork).
    Ten unparsable replies: a JudgeError (the fork: 0). Without a judge or a grading_query: the rules."""
    if judge is None or not item.row.get("grading_query"):
        return float(any(rule_score(pred, gold, item.question) for gold in item.answers))
    prompt = item.row["grading_query"].replace("{PREDICTION}", pred)
    for _ in range(10):
        try:
            content = json.loads(judge.chat([{"role": "user", "content": prompt}], 0.0, max_tokens=256, top_p=1,
                                            seed=42))
        except ValueError:
            continue
        if not isinstance(content, dict) or not {"score", "extract_answer"} <= set(content):
            return 0.0
        try:
            return float(content["score"])
        except (TypeError, ValueError):
            return 0.0
    raise JudgeError("the judge's reply was not JSON, 10 times")


MATHVERSE_EXTRACT, MATHVERSE_SCORE = (read_prompt(f"mathverse_{step}_prompt.txt") for step in ("extract", "score"))


def mathverse(pred, item, judge):
    """MathVerse as the fork scored it (utils/mathverse.py), in two judge calls: the answer extracted (its examples,
    one user message, temperature 0); an extraction equal to the reference is right; else the judge compares the two
    (its examples, temperature 0, 0.5, ... over up to 5 tries until it replies 0 or 1). Five replies without a
    verdict: a JudgeError (the fork: wrong). Without a judge: the answer itself equal to the reference."""
    gold = str(item.row.get("answer", item.answers[0])).strip()
    if judge is None:
        return float(pred.strip() == gold)
    extract = judge.chat([{"role": "user", "content": MATHVERSE_EXTRACT + pred + "'\nExtracted Answer: "}], 0.0)
    if extract.strip() == gold:
        return 1.0
    compare = (MATHVERSE_SCORE + f"\n    [Question]: {item.row.get('question_for_eval', item.question)}\n"
               f"    [Standard Answer]: {gold}\n    [Model_answer] : {extract}\n    Judgement:")
    for attempt in range(5):
        verdict = judge.chat([{"role": "user", "content": compare}], 0.5 * attempt).strip()
        if verdict in ("0", "1"):
            return float(verdict == "1")
    raise JudgeError("the judge gave no 0 / 1 judgement, 5 times")


MATHVISION_PROMPT = read_prompt("mathvision_extract_prompt.txt")


def unboxed(text):
    """The inside of the first \\boxed{...}, braces balanced (the fork's [^}]* cut "\\boxed{\\frac{16}{7}}" to
    "\\frac{16"), or the text."""
    start = text.find("\\boxed{")
    if start < 0:
        return text
    depth, i = 1, start + len("\\boxed{")
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start + len("\\boxed{"):i - 1] if not depth else text


def arithmetic(text):
    """The value of a plain arithmetic expression ("3/4", "-2.5", "2**3"), or None: what the fork's eval() of the
    answer was for, without running the model's text as code."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b if abs(b) <= 64 else None}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        return ops[type(node.op)](value(node.left), value(node.right))
    try:
        return float(value(ast.parse(text, mode="eval").body))
    except (SyntaxError, KeyError, AttributeError, TypeError, ValueError, ZeroDivisionError, OverflowError,
            RecursionError):
        return None


def same_answer(answer, gold):
    """The fork's is_equal as meant: equal text (case and spaces aside), or equal values within 1e-6 (its eval() ran
    the model's text as Python: here plain arithmetic only; its latex2sympy comparison of LaTeX: not here)."""
    answer, gold = str(answer).lower().strip(), str(gold).lower().strip()
    a, b = arithmetic(answer), arithmetic(gold)
    return answer == gold or (a is not None and b is not None and abs(a - b) < 1e-6)


def mathvision(pred, item, judge):
    """MATH-Vision as the fork scored it (utils/mathv.py): with choices, the letter can_infer finds in the answer
    (any letter found ends it, right or wrong); without, the answer equal to the reference (its \\boxed unwrapped);
    else the judge extracts the answer (its examples, one user message, at most 128 tokens) and that is compared."""
    row = item.row
    gold = unboxed(str(row.get("answer", item.answers[0])))
    options = dict(zip("ABCDEFGH", ast.literal_eval(row.get("choices") or "[]")))
    first = can_infer(pred, options) if options else pred
    if (options and first) or same_answer(first, gold) or judge is None:
        return float(same_answer(first, gold))
    prompt = MATHVISION_PROMPT + row.get("question", item.question) + "\nModel respone: " + pred + "Extracted answer:"
    extracted = judge.chat([{"role": "user", "content": prompt}], 0.0, max_tokens=128)
    if "\\(" in extracted and "\\)" in extracted:
        extracted = extracted.replace("\\(", "").replace("\\)", "")
    return float(same_answer(can_infer(extracted, options) if options else extracted, gold))


def letter(pred, item, judge):
    """MME-RealWorld and TreeBench: the option letter alone, no judge (the fork asked none)."""
    return float(option_letter(pred) == item.answers[0])


def chartqa(pred, item, judge):
    """ChartQA: 5% of a number or equal text (`relaxed`), else the verify prompt for the references left open."""
    verdicts = {gold: relaxed(pred, gold) for gold in item.answers}   # None: the judge's to say
    if any(verdicts.values()) or judge is None or None not in verdicts.values():
        return float(any(verdicts.values()))
    return max(judge.verify(item.asked or item.question, gold, pred)
               for gold, verdict in verdicts.items() if verdict is None)


# each scorer done as the fork did, by the name support/benchmarks gives it (OCRBench's was VLMEvalKit's already)
SCORING = dict(mcq=choice, wemath=choice, letter=letter, relaxed=chartqa, mathvista=mathvista, mathverse=mathverse,
               mathvision=mathvision, dynamath=dynamath, logicvista=logicvista, charxiv=charxiv)
SCORERS = tuple(SCORING)


def scores(bench):
    """Whether eval scores this benchmark as the fork did (its VLMEvalKit sets; OCRBench by VLMEvalKit's rule, which
    the fork kept)."""
    return bench.loader == "tsv" and bench.scorer in SCORERS + ("ocr",)


def score(pred, item, judge):
    """-> 1.0 / 0.0 as the fork scored the item's benchmark (a JudgeError when the judge failed)."""
    return SCORING[item.scorer](pred, item, judge)


def as_the_fork_did(pred, item):
    """The verdict the fork's own code gave, bugs included, where it needed no judge; else None. eval counts the items
    where it differs from ours (the bugs' effect on a run's number): MME-RealWorld's and TreeBench's letter (the
    first capital A-E of the answer as written, "" read as A), ChartQA's relaxed check with answer and reference
    swapped, MathVista's text and list answers (compared with "None")."""
    pred = str(pred or "")
    if item.scorer == "letter":   # extract_characters_regex; its phrase list lacked two commas
        s = pred.strip()
        for prefix in PREFIXES[:4] + (PREFIXES[4] + PREFIXES[5], PREFIXES[6] + PREFIXES[7]):
            s = s.replace(prefix, "")
        if len(s.split()) > 10 and not re.search("[ABCDE]", s):
            return 0.0
        found = re.search("[ABCDE]", s)
        letter = found[0] if found else next((c[1] for c in ("(A)", "(B)", "(C)", "(D)", "(E)")
                                              if s.lower() in c.lower()), "")
        return float(letter == item.answers[0])
    if item.scorer == "relaxed":   # relaxed_correctness_judge(target=the answer, prediction=the reference)
        verdicts = [relaxed(gold, pred.strip()) for gold in item.answers]
        return None if None in verdicts and not any(verdicts) else float(any(verdicts))
    if item.scorer == "mathvista" and item.row.get("question_type") != "multi_choice" and \
            item.row.get("answer_type") not in ("integer", "float"):
        return 0.0
    return None
