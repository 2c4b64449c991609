"""tools.py -- what the agent can do: run Python over its images, search text, search by image.

  parse_action(turn_text)   -> Action: answer / code / search / image_search / error / none
  Sandbox(images).run(code) -> stdout, stderr, images: one notebook-like Python session a trajectory
  text_search(q), image_search(img) -> (observation text, images), the original's format
  ImageSearchCache(path)    the released image-search results, keyed by the sample (as the original)

The sandbox in brief: each session is a fork of a zygote that has numpy, PIL, matplotlib, cv2,
SciPy, pandas, SymPy and scikit-learn imported, so it starts in milliseconds with `image_1 ..
image_n` defined. Before it runs anything (`notebook`, below) it locks itself down
(support/sandbox.py, `lock_down`): no network, a read-only file system with one small tmpfs to write
in, /proc hidden, uid 65534, no capabilities, a seccomp filter (no new processes, sockets or signals
to others), rlimits on memory, CPU, file size and open files, a timeout per call. The host reads
replies as length-prefixed JSON, never pickle. Every call carries a fresh nonce, so a stale reply is
refused; the nonce does NOT stop code from forging the reply to its own call (the code runs where
the nonce is), so every reply is untrusted: text capped, images checked before they are read. What
it does NOT protect against: kernel bugs (it shares the host kernel); reading world-readable files
(only writes are confined); CPU side channels; many sessions' memory caps adding up past the host's;
a machine with neither root nor unprivileged user namespaces (there it refuses to start unless
DEEPEYES_UNSAFE_SANDBOX=1, and then says loudly what is missing).
"""
import base64
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

import requests
from PIL import Image

import support.sandbox as box

SEARCH_URL = os.environ.get("DEEPEYES_SEARCH_URL", "http://127.0.0.1:8765")   # a local server
CACHE_DIR = os.environ.get("DEEPEYES_CACHE", os.path.expanduser("~/.cache/deepeyesv2"))
MAX_IMAGES_PER_CALL = box.MAX_IMAGES_PER_CALL
SandboxError = box.SandboxError   # it could not start or answer: counted, never scored
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"   # an image in the model's text
# Where an image goes in an observation: a private-use character no tool output can carry (_plain
# strips it). Observation text is encoded as plain text and one image goes at each slot.
IMAGE_SLOT = "\ue000"
OUTPUT_LIMIT = 8000   # characters of stdout / stderr kept per call


# ========================================================================================== actions
@dataclass
class Action:
    kind: str          # "answer" | "code" | "search" | "image_search" | "error" | "none"
    arg: str = ""      # the answer, the code, the query, or the error observation text


def extract_answer(response):
    """The final answer of a response, as the original's reward reads it: the first <answer>...
    </answer> after the last </think>, stripped (or None). The one parser of reward and eval."""
    tail = response.rsplit("</think>", 1)[-1]
    start = tail.find("<answer>")
    end = tail.find("</answer>", start) if start >= 0 else -1
    return tail[start + len("<answer>"):end].strip() if end >= 0 else None


def last_match(text, open_tag, close_tag):
    """The body of the last match of the lazy regex open_tag(.*?)close_tag, matches found left to
    right as the original's re.findall finds them (or None). str.find: linear, where the regex is
    quadratic over thousands of unclosed tags a policy can write."""
    body, pos = None, 0
    while (start := text.find(open_tag, pos)) >= 0:
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            break
        body, pos = text[start + len(open_tag):end], end + len(close_tag)
    return body


def last_python_fence(block):
    r"""The last match of the original's r'```python\s*\n(.*?)\n```' (DOTALL), or None, without its
    backtracking (5 s over a fence followed by 15,000 blank lines): \s* takes the blank run after
    the tag and gives back to its last newline; if no closing fence follows, to the one before."""
    code, pos, last_close = None, 0, block.rfind("\n```")
    while (start := block.find("```python", pos)) >= 0:
        end = run = start + len("```python")
        while end < len(block) and block[end].isspace():
            end += 1
        nl, pos = block.rfind("\n", run, end), end
        close = block.find("\n```", nl + 1) if 0 <= nl < last_close else -1
        if close >= 0:
            code, pos = block[nl + 1:close], close + 4
        elif nl >= 0 and block.startswith("```", nl + 1) and block.rfind("\n", run, nl) >= 0:
            code, pos = block[block.rfind("\n", run, nl) + 1:nl], nl + 4
    return code


def parse_action(text, offered=("code", "search", "image_search")):
    """What a model turn asks for, read as the original's environment reads it: an answer ends the
    episode; else `<code>` anywhere makes it a code call, the last ```python block of the last
    <code>...</code> (none: no action, the episode ends); else the last <tool_call>. A malformed
    call is an "error" observation in the original's words, which the model may recover from. A
    call of a tool the prompt does not offer is no action, as in the authors' eval loop under the
    code prompt: nothing runs, and the turn's text is the response."""
    answer = last_match(text, "<answer>", "</answer>")
    if answer is not None:
        return Action("answer", answer.strip())
    if "<code>" in text and "code" in offered:
        code = last_python_fence(last_match(text, "<code>", "</code>") or "")
        return Action("none") if code is None else Action("code", code)
    raw = last_match(text, "<tool_call>", "</tool_call>")
    if raw is None or not {"search", "image_search"} & set(offered):
        return Action("none")
    try:
        call = json.loads(raw.strip())
    # RecursionError: "[[[[..." nested past the parser's stack
    except (ValueError, RecursionError) as e:
        return Action("error", f"Error: Invalid tool call format: {raw.strip()}. Error: {e}")
    try:
        name = call["name"]
        if name not in ("search", "image_search"):
            return Action("error", f"Error: Invalid tool call name: {raw.strip()}.")
        if name == "image_search" and call.get("arguments") is not None:
            return Action("error", "Error: Invalid tool call parameters for image search: "
                                   f"{raw.strip()}.")
        query = "" if name == "image_search" else str(call["arguments"]["query"])
        if name == "search" and not query.strip():   # the model's slip, not a search outage
            return Action("error", "Error: the search query is empty.")
        return Action(name, query)
    # a list, a string, no "name", no "query": the exception's text, as the original's
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        return Action("error", f"Error: {e}")


# ====================================================================================== the sandbox
class Sandbox:
    """A notebook-like Python session for one trajectory, `.run(code)` -> dict; a context manager:
    `with Sandbox([img]) as sb: sb.run("print(image_1.size)")["stdout"]`."""

    def __init__(self, images=(), timeout=20, memory_mb=2048, cpu_seconds=120, scratch_mb=64):
        self.images = list(images)
        self.limits = dict(timeout=int(timeout), memory_mb=memory_mb, cpu_seconds=cpu_seconds,
                           scratch_mb=scratch_mb)
        self.sock = self.pid = self.scratch = None
        self._start()

    def _start(self):
        self.scratch = tempfile.mkdtemp(prefix="deepeyes-sandbox-")
        os.chmod(self.scratch, 0o777)
        ours, theirs = socket.socketpair()
        try:
            self.pid = box.Zygote.spawn(theirs, self.scratch, self.limits)
        finally:
            theirs.close()
        self.sock = ours
        self.sock.settimeout(30)
        try:
            self.protections = box.recv(self.sock)["protections"]
            box.check_protections(self.protections)   # unconfined: refused (or warned, README)
            box.send(self.sock, {}, self.images)
            box.recv(self.sock)
        except (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError) as e:
            self.close()
            raise SandboxError(f"sandbox failed to start: {str(e)[:300]}") from e

    def run(self, code):
        """One cell -> stdout, stderr, images (PIL). Code that times out or dies (memory, CPU time)
        restarts the session and says so; a reply that breaks the channel's protocol (code in the
        session can write to it) restarts it too and raises SandboxError (counted, never scored)."""
        self.sock.settimeout(self.limits["timeout"] + 5)   # a backstop to the in-session alarm
        nonce = os.urandom(8).hex()   # unguessable: a reply forged in one call fails the next
        try:
            box.send(self.sock, {"code": code, "nonce": nonce})
            reply = box.recv(self.sock, from_session=True)
            if reply.get("nonce") != nonce or not isinstance(reply.get("stdout"), str) or \
                    not isinstance(reply.get("stderr"), str):
                raise box.ProtocolError("a reply that does not answer this call")
        except (OSError, EOFError) as e:
            why = "timed out" if isinstance(e, socket.timeout) else \
                "died (memory, CPU-time or output limit)"
            self._restart()
            return dict(stdout="", images=[], stderr=f"Error: the code {why}; the Python session "
                        "was restarted, variables were lost; image_1.. are loaded again.")
        except (box.ProtocolError, ValueError, KeyError, TypeError, AttributeError,
                RecursionError) as e:
            self._restart()
            raise SandboxError(f"the sandbox channel broke ({str(e)[:100]}); the session was "
                               "restarted") from e
        return dict(stdout=reply["stdout"][:2 * OUTPUT_LIMIT],
                    stderr=reply["stderr"][:2 * OUTPUT_LIMIT],
                    images=[fit_code_image(im) for im in reply["images"][:MAX_IMAGES_PER_CALL]])

    def _restart(self):
        self.close()
        self._start()

    def close(self):
        """Kill the session with everything it started, and remove its scratch directory."""
        if self.sock is not None:
            self.sock.close()
        if self.pid:
            try:
                os.killpg(self.pid, signal.SIGKILL)   # the session's whole process group
            except ProcessLookupError:
                pass
        if self.scratch and os.path.isdir(self.scratch):
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.sock = self.pid = self.scratch = None

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fit_code_image(im):
    """The original's rescale of an image from code: an aspect ratio over 200 is cut (the long side
    to min(150, ratio / 2) times the short, the short one grown to match), then a side under 32 px
    is grown to 32; LANCZOS. (model.prepare_image then applies, as to every image.)"""
    w, h = im.size
    ratio = max(w, h) / min(w, h)
    if ratio > 200:
        keep = min(150, ratio / 2)
        longer, shorter = int(min(w, h) * keep), int(min(w, h) * ratio / keep)
        w, h = (longer, shorter) if w >= h else (shorter, longer)
        im = im.resize((w, h), Image.LANCZOS)
    if min(w, h) < 32:
        s = 32 / min(w, h)
        im = im.resize((math.ceil(w * s), math.ceil(h * s)), Image.LANCZOS)
    return im


def _plain(s):
    """Tool output as text: whatever it holds, it cannot claim an image slot."""
    return str(s).replace(IMAGE_SLOT, "")


def format_code_result(result):
    """The original's observation for a code call (stripped); one image slot per returned image."""
    text = (f"Code execution result:\nstdout:\n```\n{_plain(result['stdout'])}\n```\n\n"
            f"stderr:\n```\n{_plain(result['stderr'])}\n```\n\n")
    if result["images"]:
        text += "Images:\n" + IMAGE_SLOT * len(result["images"])
    return text.strip()


# =========================================================================================== search
class SearchError(RuntimeError):
    """The search backend is unreachable or broken (infrastructure, not the model's fault)."""


def post_json(url, payload, read, error, headers=None, retries=3, timeout=20):
    """POST JSON with retries and backoff -> read(the reply's JSON). A failure of any kind (network,
    HTTP status, a reply `read` rejects) is tried again, then raised as `error`: a backend that is
    down is an infrastructure error, never a wrong answer (the search client and the judge)."""
    last = None
    for attempt in range(retries):
        try:
            r = requests.post(url, json=payload, headers=headers or {}, timeout=timeout)
            r.raise_for_status()
            return read(r.json())
        except (requests.RequestException, KeyError, IndexError, TypeError, ValueError) as e:
            last = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        time.sleep(0.5 * 2 ** attempt)
    raise error(f"{url} failed after {retries} tries: {last}")


def _serper_shaped(reply):
    if not isinstance(reply, dict) or not isinstance(reply.get("organic", []), list):
        raise ValueError("the reply is not Serper-shaped JSON")
    return reply


def _post(path, payload, url=None):
    """POST to the Serper-style endpoint; the key comes from the environment."""
    headers = {"X-API-KEY": os.environ.get("SERPER_API_KEY", "")}   # (JSON: requests says so)
    return post_json((url or SEARCH_URL).rstrip("/") + path, payload, _serper_shaped, SearchError,
                     headers)


def _cached(kind, key, fetch):
    """On-disk cache: one JSON file per query / image hash, so repeated rollouts never pay twice."""
    path = os.path.join(CACHE_DIR, "search", kind, hashlib.sha256(key).hexdigest() + ".json")
    try:
        with open(path) as f:
            return json.load(f)
    # not cached yet, or a corrupt entry (a crash mid-write, a full disk): fetch it
    except (OSError, ValueError):
        pass
    value = fetch()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)
    return value


def text_search(query, k=5, url=None, cache=True):
    """-> (observation text, []) for a web search, formatted as the original (data/PROTOCOL.md)."""
    fetch = lambda: _post("/search", {"q": query, "num": k}, url).get("organic", [])[:k]
    key = f"{url or SEARCH_URL}|{k}|{query}".encode()
    results = _cached("text", key, fetch) if cache else fetch()
    results = [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []
    items = []
    for i, r in enumerate(results, 1):
        item = f"{i}. [{_plain(r.get('title', ''))}]({_plain(r.get('link', ''))})"
        item += f"\nDate published: {_plain(r['date'])}" if r.get("date") else ""
        item += "\n" + (f"\n{_plain(r['snippet'])}" if r.get("snippet") else "")
        items.append(item)
    text = (f"A Google search for '{_plain(query)}' found {len(results)} results:\n\n"
            "## Web Results\n" + "\n\n".join(items))
    return f"<tool_response>\n{text}\n</tool_response>", []


def image_search(image, k=3, url=None, cache=True):
    """-> (observation text, result images) of a reverse image search, as the original's."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)   # the cache key and payload
    png = buf.getvalue()
    fetch = lambda: _post("/lens", {"image_b64": base64.b64encode(png).decode(), "num": k},
                          url).get("organic", [])[:k]
    results = _cached("image", (url or SEARCH_URL).encode() + png, fetch) if cache else fetch()
    decode = lambda b64: Image.open(io.BytesIO(base64.b64decode(b64)))
    return format_image_results([(r.get("title", ""), decode(r["image_b64"]) if r.get("image_b64")
                                  else None) for r in results])


def format_image_results(results):
    """[(title, PIL image or None)] -> (observation text, images). The original's "<image>" marks
    where each result image goes: here an image slot."""
    items = [f"{i}. {IMAGE_SLOT if img is not None else '(no image)'}\n[{_plain(title)}] \n"
             for i, (title, img) in enumerate(results, 1)]
    text = f"A Google image search for the image found {len(results)} results:\n\n## Web Results\n"
    text += "\n\n".join(items)
    images = [img.convert("RGB") for _, img in results if img is not None]
    return f"<tool_response>\n{text}\n</tool_response>", images


class ImageSearchCache:
    """The original's image search: results cached per training sample (reverse-image APIs need a
    public image URL). The released cache is one JSON file {data_index: {"tool_returned_web_title":
    [...], "cached_images_path": [...]}} keyed by the sample's `extra_info.index` (our `id`); a
    result counts when its image file exists (paths relative to the file). A sample without an entry
    (all but the FVQA ones) gives None: the rollout ends the episode, as the original did, which
    penalises image searches where they cannot help (`end_on_miss=False`: an error observation)."""

    def __init__(self, path, end_on_miss=True):
        self.end_on_miss = end_on_miss
        try:
            with open(path, encoding="utf-8") as f:
                self.entries = json.load(f)
        except (OSError, ValueError) as e:
            raise SearchError(f"image-search cache {path} cannot be read: {str(e)[:200]}") from e
        if not isinstance(self.entries, dict):
            raise SearchError(f"image-search cache {path} is not a JSON object keyed by index")
        self.root = os.path.dirname(os.path.abspath(path))

    def __call__(self, key):
        entry = self.entries.get(str(key))
        if not isinstance(entry, dict):
            return None if self.end_on_miss else ("Error: image search found nothing for this "
                                                  "image.", [])
        results = []
        for title, path in zip(entry.get("tool_returned_web_title") or [],
                               entry.get("cached_images_path") or []):
            path = os.path.join(self.root, str(path))
            try:
                results.append((str(title), Image.open(path).convert("RGB")))
            except OSError:   # a listed image that is not there (the original skipped those too)
                continue
        return format_image_results(results[:MAX_IMAGES_PER_CALL])


# ============================================================================== the sandbox, inside
def notebook(sock, scratch, limits):
    """The session: each cell run in one persistent namespace; its output and figures sent back."""
    import ast
    import traceback
    import matplotlib.pyplot as plt
    got = box.lock_down(scratch, limits)
    shown = []

    def show(*a, **k):   # the original's: each open figure, laid out tight, as a PNG
        for num in plt.get_fignums():
            fig, buf = plt.figure(num), io.BytesIO()
            with warnings.catch_warnings():   # "tight_layout not applied": as the original, quiet
                warnings.simplefilter("ignore")
                fig.tight_layout()
                fig.savefig(buf, bbox_inches="tight", format="png")
            shown.append(Image.open(buf))
        plt.close("all")
    plt.show = show
    # as the original's IPython without a screen: display() and a final expression print the
    # value's repr; Image.show() shows nothing (no viewer). Images come back only at plt.show().
    Image.Image.show = lambda self, *a, **k: None
    display = lambda *objs: print(*map(repr, objs), sep="\n")
    # what the original's session had run before the model's first cell: its safety prelude and
    # the image loader (released trajectories use plt and Image without importing them)
    namespace = {"__name__": "__main__", "display": display, "plt": plt, "os": os, "sys": sys,
                 "Image": Image, "base64": base64, "BytesIO": io.BytesIO}
    def on_alarm(*_):
        raise TimeoutError(f"code execution exceeded {limits['timeout']} s; the session goes on")
    signal.signal(signal.SIGALRM, on_alarm)
    box.send(sock, {"protections": got})
    while True:
        try:
            req = box.recv(sock)
        except EOFError:
            os._exit(0)
        if "code" not in req:   # the first message: the sample's images
            namespace.update({f"image_{i}": im for i, im in enumerate(req["images"], 1)})
            box.send(sock, {"ok": True})
            continue
        out, err = box.Bounded(OUTPUT_LIMIT), box.Bounded(OUTPUT_LIMIT)
        shown.clear()
        plt.close("all")   # figures a timed-out call left open would come back at each show()
        sys.stdout, sys.stderr = out, err
        try:
            tree = ast.parse(req["code"], "<string>")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            signal.alarm(limits["timeout"])
            exec(compile(tree, "<code>", "exec"), namespace)
            if last is not None:   # like a notebook cell: print the value of a final expression
                value = eval(compile(ast.Expression(last.value), "<code>", "eval"), namespace)
                if value is not None:
                    display(value)
        except SyntaxError as e:   # the original's wording
            err.write(f"SyntaxError - {e}")
        except BaseException:     # the user's exception, SystemExit and KeyboardInterrupt included
            etype, evalue, tb = sys.exc_info()
            err.write("".join(traceback.format_exception(etype, evalue, tb.tb_next)))
        finally:
            signal.alarm(0)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        err.write(box.stop_stray_threads())
        images = shown[:MAX_IMAGES_PER_CALL]
        if len(shown) > len(images):
            err.write(f"\n[{len(shown) - len(images)} images dropped: at most "
                      f"{MAX_IMAGES_PER_CALL} per call]")
        for i, im in enumerate(images):   # bounded in size, in a mode the host can rebuild
            images[i] = im if im.mode in ("RGB", "RGBA", "L") else im.convert("RGB")
            images[i].thumbnail((4096, 4096))
        box.send(sock, {"stdout": out.text(), "stderr": err.text(), "nonce": req["nonce"]}, images)
