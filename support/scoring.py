"""support/scoring.py -- deciding whether an answer is right: the rule scorer and the LLM judge.

grpo.compute_reward holds the paper's reward formula; this module holds what it and eval.score call to decide
accuracy. `rule_score` is the offline judge, the one rule set of training and evaluation: option letters A-H or an
option's text (an answer naming two options chooses neither), numbers within a tolerance, normalised text, RealX's
" or " alternatives. `LLMJudge` is the original's judge: its prompts byte for byte (data/prompts/), its temperatures
(0.3 perception and search, 0.5 math), its verdict parsing; a reply without a verdict, or a judge that cannot be
reached, is a JudgeError (an infrastructure error, never a wrong answer). `normalize_final_answer` is the Minerva
normalisation the original applies before the math judge. `judged_choice` maps a free answer to an option, as
VLMEvalKit does; `ocr_match` is OCRBench's rule.
"""
import os
import re

import tools

PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "prompts")


LETTERS = "ABCDEFGH"


def normalize(s):
    """Text for comparison: \\boxed / \\text unwrapped, $ and separators dropped, lower case, no articles."""
    s = str(s).strip()
    s = re.sub(r"\\boxed\{(.*)\}", r"\1", s)
    s = re.sub(r"\\text(?:bf)?\{(.*?)\}", r"\1", s)
    s = s.replace("$", "").replace("\\%", "%").replace("\\!", "").replace("dfrac", "frac")
    s = re.sub(r"(\d),(\d{3})", r"\1\2", s)
    s = s.lower().strip().rstrip(".").strip()
    s = re.sub(r"^(the answer is|answer:)\s*", "", s)
    s = re.sub(r"\b(a|an|the)\b\s*", "", s)
    return re.sub(r"\s+", " ", s).strip()


def as_number(s):
    s = normalize(s).rstrip("%").strip()
    m = re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", s) or re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", s)
    if not m:
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*[a-z°%]{0,12}", s)   # "42 cm", "3.5 kg": drop the unit
        return float(m.group(1)) if m else None
    if "/" in s:
        return int(m.group(1)) / int(m.group(2)) if int(m.group(2)) else None
    return float(s)


def choice_letter(s, options=()):
    """The one option letter an answer names: "B", "(B)", "B. text", "Option B" (letters A-H, or one per option).
    None if it names none, or more than one ("(B) and (E)", "B or D", "B is wrong; A is right"): naming two options
    is not choosing one (VLMEvalKit's can_infer_option refuses those too)."""
    m = re.fullmatch(r"\s*\(?(?:[Oo]ption\s+)?([A-Ha-h])\)?[.:)]?(?:\s(.*))?", str(s), re.DOTALL)
    if not m:
        return None
    letter, rest = m.group(1).upper(), m.group(2) or ""
    valid = LETTERS[:len(options)] if options else LETTERS
    if letter in valid[:len(options)] and normalize(rest) == normalize(options[LETTERS.index(letter)]):
        return letter   # "B. A cat": the option's own text, whose "A" is an article
    others = set(re.sub(r"[.()\[\],:;!*#{}]", " ", rest).split()) & set(valid) - {letter}
    return None if others else letter


def parse_options(question):
    """Option texts written in a question ("A. red", "(B) blue", "C: green", one a line), in letter order."""
    found = dict(re.findall(r"(?m)^\s*\(?([A-H])[.):]\s*(.+?)\s*$", str(question)))
    letters = LETTERS[:len(found)]
    return [found[x] for x in letters] if found and all(x in found for x in letters) else []


def rule_score(pred, gold, question="", options=None, tolerance=1e-4):
    """1.0 if `pred` answers `gold` by rules, else 0.0. Multiple choice (gold a letter, or an option's text): the
    option's text or its letter, A-H; otherwise any of gold's " or " alternatives as a number within `tolerance`
    (relative) or as normalised text. `options` default to those written in the question."""
    if pred is None or not str(pred).strip():
        return 0.0
    options = parse_options(question) if options is None else list(options)
    texts = [normalize(o) for o in options]
    gold = str(gold).strip()
    if normalize(gold) in texts and not re.fullmatch(r"[A-H]", gold):
        gold = LETTERS[texts.index(normalize(gold))]       # the gold given as the option's text
    if re.fullmatch(r"[A-H]", gold):
        # the option text first: "a cat" is option B's text, not the letter "a"
        letter = LETTERS[texts.index(normalize(pred))] if normalize(pred) in texts else \
            choice_letter(pred, options)
        return float(letter == gold)
    alternatives = [gold] + ([g.strip() for g in gold.split(" or ")] if " or " in gold else [])   # RealX style
    for alt in alternatives:
        a, b = as_number(pred), as_number(alt)
        if (a is not None and b is not None and abs(a - b) <= tolerance * max(1.0, abs(b))) or \
                normalize(pred) == normalize(alt):
            return 1.0
    return 0.0


# ---- the LLM judge, as the original (its prompts are data/prompts/judge_*, math_judge_prompt.txt)
def normalize_final_answer(answer):
    """Minerva-style normalisation of a math answer, as the original applies it before the math judge: the text
    after the last "=", unit words and \\text{} removed, $...$ kept, \\boxed{} unwrapped, \\fracab ->
    \\frac{a}{b}, digits with commas joined."""
    answer = answer.split("=")[-1]
    for before, after in MINERVA_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in MINERVA_REMOVED:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    for macro in ("text", "textbf", "overline"):
        answer = re.sub(r"(\\" + macro + r"\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer).replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


MINERVA_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                         (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]


MINERVA_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
                   "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
                   "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
                   "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
                   r",\!", "{,}", '"', "\\dots"]


class JudgeError(RuntimeError):
    """The LLM judge could not be reached or gave no verdict: an infrastructure error, never a wrong answer."""


def read_prompt(name):
    with open(os.path.join(PROMPTS, name), encoding="utf-8") as f:
        return f.read()


class LLMJudge:
    """The original's judge (the paper: Qwen2.5-72B-Instruct behind an OpenAI-compatible server).
    perception / search: the Chinese judge prompt, temperature 0.3, verdict `\\boxed{Yes}` (inside <最终结果>).
    reason: the math-equivalence prompt as one user message, temperature 0.5, verdict after `## Equivalence Judgement`.
    A reply with no verdict in it raises JudgeError (the original scored it 0: a silent wrong answer)."""
    SYSTEM, USER, MATH = (read_prompt(n) for n in ("judge_system_prompt.md", "judge_user_prompt.txt",
                                                   "math_judge_prompt.txt"))

    def __init__(self, url, model, api_key=None, timeout=120, retries=3):
        self.url, self.model, self.timeout, self.retries = url.rstrip("/"), model, timeout, retries
        self.api_key = api_key or os.environ.get("JUDGE_API_KEY", "EMPTY")

    def perception(self, question, gold, pred):
        reply = self.chat([{"role": "system", "content": self.SYSTEM},
                           {"role": "user", "content": self.USER.format(question=question, answer=gold,
                                                                        prediction=pred)}], 0.3, max_tokens=8192)
        verdict = reply.split("<最终结果>")[-1].split("<\\最终结果>")[0]
        if "boxed{" not in verdict:
            raise JudgeError(f"judge reply has no \\boxed verdict: {reply[-200:]!r}")
        return float("Yes" in verdict.split("boxed{")[-1].split("}")[0])

    def verify(self, question, gold, pred):
        """The authors' VLMEvalKit fork's judge for ChartQA (utils/judge_utils.py): the same Chinese prompt, with the
        question, reference and answer appended, as one user message at temperature 0; "yes" (any case) in the
        verdict. (The fork passed the reference and the answer the other way round: here as it meant.)"""
        reply = self.chat([{"role": "user", "content": self.SYSTEM + f"【用户问题】:{question}\n【参考答案】：{gold}\n"
                                                                     f"【模型回答】：{pred}"}], 0.0)
        verdict = reply.split("<最终结果>")[-1].split("<\\最终结果>")[0]
        if "boxed" not in verdict:
            raise JudgeError(f"judge reply has no \\boxed verdict: {reply[-200:]!r}")
        return float("yes" in verdict.split("boxed")[-1].split("}")[0].lower())

    def math(self, question, gold, pred):
        if not pred:
            return 0.0
        reply = self.chat([{"role": "user", "content": self.MATH.format(query=question, gold_ans=gold,
                                                                        pred_ans=pred)}], 0.5)
        verdict = reply.split("## Equivalence Judgement")[-1].lower()
        if ("true" in verdict) == ("false" in verdict):
            raise JudgeError(f"judge reply has no TRUE / FALSE verdict: {reply[-200:]!r}")
        return float("true" in verdict)

    def chat(self, messages, temperature, max_tokens=None, **sampling):
        body = dict(model=self.model, messages=messages, temperature=temperature,
                    **({"max_tokens": max_tokens} if max_tokens else {}), **sampling)
        return tools.post_json(self.url + "/chat/completions", body, lambda reply: str(
            reply["choices"][0]["message"]["content"]).strip(), JudgeError,
            {"Authorization": f"Bearer {self.api_key}"}, self.retries, self.timeout)


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
        raise JudgeError(f"the judge named no option: {reply[:100]!r}")
    return found.group(1)


