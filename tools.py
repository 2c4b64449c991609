"""tools.py -- what the agent can do: run Python over its images, search text, search by image. No torch here.

  Sandbox(images)              one locked-down, notebook-like Python process per trajectory
  text_search(q) / image_search(img) -> (observation text, images)   the original's format, Serper-style JSON
  parse_action(turn_text)      -> Action: answer / code / search / image_search / error / none (original precedence)
  python tools.py serve        the embedded search backend on 127.0.0.1 (BM25 over data/ text, image nearest neighbour)
  python tools.py --bench      sandbox latency: session start, warm call, 16 parallel sessions vs a fresh process

How the sandbox is limited (all of it in `_lock_down`, the one place to read):
  - a *zygote* process imports numpy / PIL / matplotlib / cv2 / scipy / pandas / sympy / scikit-learn once; each
    session is a fork of it, so a session starts in milliseconds with everything preloaded, and `image_1 ..
    image_n` are defined before the first call;
  - the session gets new network and mount namespaces: no network at all, the whole file system read-only,
    /proc hidden (no host environment to read), a size-capped tmpfs as the only writable place (its cwd, TMPDIR);
  - a session started by root drops to the unprivileged uid 65534 (root-only host files stay unreadable);
  - every capability is dropped; a seccomp filter refuses fork / exec / clone of processes (threads are allowed),
    sockets, signals to any other process, ptrace, mount and namespace calls;
  - rlimits: address space, CPU seconds, file size, open files; each call has a timeout (SIGALRM inside, a hard
    kill outside, after which the session restarts with its images and says so); stdout/stderr are bounded.
  - the host reads results as length-prefixed JSON with a size cap, never pickle: a session cannot make the host
    execute anything; each call carries a fresh nonce, and a reply that does not answer it restarts the session as
    an infrastructure error. The nonce stops a stale reply (one written to the channel during an earlier call) from
    answering a later call; it does NOT stop code from forging the reply to its own call (the code runs in the
    process that holds the nonce). So every reply is treated as untrusted: text is capped, and images are checked
    before they are read (count, mode, 1..4096 px a side, exact bytes), so a forged reply gets no further than
    code that prints and shows images could;
  - threads a call leaves running are stopped, and figures it leaves open closed, when the call ends.
What it does NOT protect against: kernel bugs (it shares the host kernel); reading world-readable files (allowed by
design: only writes are confined); CPU side channels; the sum of many sessions' memory caps exceeding the host's;
a machine where neither root nor unprivileged user namespaces are available -- there the sandbox refuses to start
unless DEEPEYES_UNSAFE_SANDBOX=1, and then it says loudly which protections are missing.
"""
import argparse
import base64
import ctypes
import hashlib
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import requests
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
SEARCH_URL = os.environ.get("DEEPEYES_SEARCH_URL", "http://127.0.0.1:8765")   # default: `python tools.py serve`
CACHE_DIR = os.environ.get("DEEPEYES_CACHE", os.path.expanduser("~/.cache/deepeyesv2"))
MAX_IMAGES_PER_CALL = 10
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"   # where an image goes in the model's text
# Where an image goes in an observation: a private-use character no tool output can carry (_plain strips it). The
# rollout encodes observation text as plain text (a web page's "<|im_end|>" must not end the turn) and puts one
# image at each slot.
IMAGE_SLOT = "\ue000"
OUTPUT_LIMIT = 8000          # characters of stdout / stderr kept per call
MAX_MESSAGE = 64 << 20       # the largest reply the host accepts from a session
# What the original's sandbox offered the model's code besides numpy, PIL and matplotlib (its requirements.txt:
# opencv, scipy, pandas, sympy, scikit-learn): released trajectories import them, and an ImportError would turn a
# good trajectory into a failed one. Preloaded in the zygote: a session forks with them already imported.
PRELOAD = ["numpy", "cv2", "scipy.ndimage", "scipy.signal", "pandas", "sympy", "sklearn.cluster"]


# ================================================================================================ actions
@dataclass
class Action:
    kind: str          # "answer" | "code" | "search" | "image_search" | "error" | "none"
    arg: str = ""      # the answer, the code, the query, or the error observation text


def extract_answer(response):
    """The final answer of a whole response, read as the original's reward reads it: the first <answer>...</answer>
    after the last </think>, stripped (None if there is none). The one answer parser of reward, eval and rollout."""
    tail = response.rsplit("</think>", 1)[-1]
    start = tail.find("<answer>")
    end = tail.find("</answer>", start) if start >= 0 else -1
    return tail[start + len("<answer>"):end].strip() if end >= 0 else None


def last_between(text, open_tag, close_tag):
    """The text inside the last open_tag ... close_tag pair (None if none). str.rfind, not a regex: a policy at
    temperature 1 can write thousands of unclosed tags, and a lazy regex is quadratic over them."""
    end = text.rfind(close_tag)
    start = text.rfind(open_tag, 0, end) if end >= 0 else -1
    return text[start + len(open_tag):end] if start >= 0 else None


def parse_action(text, offered=("code", "search", "image_search")):
    """What a model turn asks for. The original's precedence: answer > code > tool_call; the last match of each wins.
    Whatever the text, this returns an Action: a malformed call is an "error" the model reads and may recover from.
    A call of a tool the prompt does not offer (`offered`) is no action, as in the authors' eval loop under the code
    prompt: nothing runs, and the turn's text is the response."""
    answer = last_between(text, "<answer>", "</answer>")
    if answer is not None:
        return Action("answer", answer.strip())
    if "<code>" in text and "code" in offered:
        block = text.rsplit("<code>", 1)[1].split("</code>", 1)[0]
        start = block.rfind("```python")
        while start >= 0:   # the last closed fence (each find stops at the next fence: linear)
            end = block.find("```", start + len("```python"))
            if end >= 0:
                return Action("code", block[start + len("```python"):end].lstrip())
            start = block.rfind("```python", 0, start)
        return Action("error", "Error: no ```python block found inside <code></code>.")
    call = last_between(text, "<tool_call>", "</tool_call>")
    if call is None or not {"search", "image_search"} & set(offered):
        return Action("none")
    try:
        call = json.loads(call.strip())
    except (ValueError, RecursionError) as e:   # RecursionError: "[[[[..." nested past the parser's stack
        return Action("error", f"Error: the tool call is not valid JSON ({str(e)[:200]}).")
    if not isinstance(call, dict):
        return Action("error", "Error: the tool call must be a JSON object with a 'name'.")
    name, args = call.get("name"), call.get("arguments")
    if name == "search":
        query = args.get("query") if isinstance(args, dict) else None
        if not isinstance(query, str) or not query.strip():
            return Action("error", "Error: search needs {\"arguments\": {\"query\": \"...\"}}.")
        return Action("search", query.strip())
    if name == "image_search":
        if args:
            return Action("error", "Error: image_search takes no arguments; it searches the original image.")
        return Action("image_search")
    return Action("error", f"Error: unknown tool {str(name)[:100]!r}; the tools are 'search' and 'image_search'.")


# ================================================================================================ the sandbox
class Sandbox:
    """A notebook-like Python session for one trajectory. Use as a context manager; `.run(code)` -> dict.

    >>> with Sandbox([img]) as sb: sb.run("print(image_1.size)")["stdout"]
    """
    warned = False

    def __init__(self, images=(), timeout=20, memory_mb=2048, cpu_seconds=120, scratch_mb=64):
        self.images = list(images)
        self.limits = dict(timeout=int(timeout), memory_mb=memory_mb, cpu_seconds=cpu_seconds, scratch_mb=scratch_mb)
        self.sock = self.pid = self.scratch = None
        self.restarts = 0
        self._start()

    def _start(self):
        self.scratch = tempfile.mkdtemp(prefix="deepeyes-sandbox-")
        os.chmod(self.scratch, 0o777)
        ours, theirs = socket.socketpair()
        try:
            self.pid = _Zygote.spawn(theirs, self.scratch, self.limits)
        finally:
            theirs.close()
        self.sock = ours
        self.sock.settimeout(30)
        try:
            self.protections = _recv(self.sock)["protections"]
            _send(self.sock, {}, self.images)
            _recv(self.sock)
        except (OSError, EOFError, ValueError, KeyError, TypeError, RecursionError) as e:
            self.close()
            raise SandboxError(f"sandbox failed to start: {str(e)[:200]}") from e
        self._check_protections()

    def _check_protections(self):
        missing = [k for k in ("namespaces", "read-only fs", "/proc hidden", "no capabilities", "seccomp",
                               "unprivileged")
                   if not self.protections.get(k)]
        if not missing:
            return
        if os.environ.get("DEEPEYES_UNSAFE_SANDBOX") != "1":
            self.close()
            raise SandboxError(f"sandbox cannot isolate code here (missing: {', '.join(missing)}); enable "
                               "unprivileged user namespaces or run as root, or set DEEPEYES_UNSAFE_SANDBOX=1 to "
                               "run model code WITHOUT these protections")
        if not Sandbox.warned:
            Sandbox.warned = True
            print(f"WARNING: sandbox running WITHOUT: {', '.join(missing)} (DEEPEYES_UNSAFE_SANDBOX=1)",
                  file=sys.stderr)

    def run(self, code):
        """Run one cell. Returns stdout, stderr and images (PIL). Code that times out or dies (memory, CPU time)
        restarts the session and says so; a reply that breaks the channel's protocol (malformed, oversized, not the
        answer to this call: code inside the session can write to the channel) restarts it too and raises
        SandboxError, an infrastructure error that is counted, never scored."""
        self.sock.settimeout(self.limits["timeout"] + 5)   # the in-session alarm fires first; this is the backstop
        nonce = os.urandom(8).hex()   # unguessable per call: a reply forged during one call cannot answer the next
        try:
            _send(self.sock, {"code": code, "nonce": nonce})
            reply = _recv(self.sock, from_session=True)
            if reply.get("nonce") != nonce or not isinstance(reply.get("stdout"), str) or \
                    not isinstance(reply.get("stderr"), str):
                raise _ProtocolError("a reply that does not answer this call")
        except (OSError, EOFError) as e:
            why = "timed out" if isinstance(e, socket.timeout) else "died (memory, CPU-time or output limit)"
            self._restart()
            return dict(stdout="", images=[], stderr=f"Error: the code {why}; the Python session was restarted, "
                                                     f"variables were lost; image_1.. are loaded again.")
        except (_ProtocolError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            self._restart()
            raise SandboxError(f"the sandbox channel broke ({str(e)[:100]}); the session was restarted") from e
        return dict(stdout=reply["stdout"][:2 * OUTPUT_LIMIT], stderr=reply["stderr"][:2 * OUTPUT_LIMIT],
                    images=reply["images"][:MAX_IMAGES_PER_CALL])

    def _restart(self):
        self.close()
        self.restarts += 1
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
            import shutil
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.sock = self.pid = self.scratch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


class SandboxError(RuntimeError):
    """Infrastructure failure (the sandbox could not start or answer): counted by the caller, never scored."""


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


# ================================================================================================ search
class SearchError(RuntimeError):
    """The search backend is unreachable or broken (infrastructure, not the model's fault)."""


def post_json(url, payload, read, error, headers=None, retries=3, timeout=20):
    """POST JSON with retries and exponential backoff -> read(the reply's JSON). A failure of any kind (network, HTTP
    status, a reply `read` rejects) is tried again, then raised as `error`: a backend that is down is an
    infrastructure error, never a wrong answer. The search client and the judge (grpo.LLMJudge) both use it."""
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
    return post_json((url or SEARCH_URL).rstrip("/") + path, payload, _serper_shaped, SearchError,
                     {"X-API-KEY": os.environ.get("SERPER_API_KEY", ""), "Content-Type": "application/json"})


def _cached(kind, key, fetch):
    """On-disk cache: one JSON file per query / image hash, so repeated rollouts never pay twice."""
    path = os.path.join(CACHE_DIR, "search", kind, hashlib.sha256(key).hexdigest() + ".json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):   # not cached yet, or a corrupt entry (a crash mid-write, a full disk): fetch it
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
    results = _cached("text", f"{url or SEARCH_URL}|{k}|{query}".encode(), fetch) if cache else fetch()
    results = [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []
    items = []
    for i, r in enumerate(results, 1):
        item = f"{i}. [{_plain(r.get('title', ''))}]({_plain(r.get('link', ''))})"
        item += f"\nDate published: {_plain(r['date'])}" if r.get("date") else ""
        item += "\n" + (f"\n{_plain(r['snippet'])}" if r.get("snippet") else "")
        items.append(item)
    text = (f"A Google search for '{_plain(query)}' found {len(results)} results:\n\n## Web Results\n"
            + "\n\n".join(items))
    return f"<tool_response>\n{text}\n</tool_response>", []


def image_search(image, k=3, url=None, cache=True):
    """-> (observation text, result images) for a reverse image search, formatted as the original."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)   # fast: the bytes are the cache key and payload
    png = buf.getvalue()
    fetch = lambda: _post("/lens", {"image_b64": base64.b64encode(png).decode(), "num": k}, url).get("organic", [])[:k]
    results = _cached("image", (url or SEARCH_URL).encode() + png, fetch) if cache else fetch()
    return format_image_results([(r.get("title", ""), Image.open(io.BytesIO(base64.b64decode(r["image_b64"])))
                                  if r.get("image_b64") else None) for r in results])


def format_image_results(results):
    """[(title, PIL image or None)] -> (observation text, images). The original's "<image>" marks where each result
    image goes: here an image slot."""
    items = [f"{i}. {IMAGE_SLOT if img is not None else '(no image)'}\n[{_plain(title)}] \n"
             for i, (title, img) in enumerate(results, 1)]
    text = f"A Google image search for the image found {len(results)} results:\n\n## Web Results\n" + "\n\n".join(items)
    return f"<tool_response>\n{text}\n</tool_response>", [img.convert("RGB") for _, img in results if img is not None]


class ImageSearchCache:
    """The original's image search: reverse-image results cached per training sample, because reverse-image APIs
    need a public image URL. The released DeepEyesV2 search cache is one JSON file
    {data_index: {"tool_returned_web_title": [...], "cached_images_path": [...]}}, keyed by the sample's
    `extra_info.index` (our `id`); a result is returned when its image file exists (paths relative to the file).
    The original ended the episode when a sample had no entry; here that is an error observation and the model goes
    on (the reward then decides whether going on without it was right)."""

    def __init__(self, path):
        try:
            with open(path, encoding="utf-8") as f:
                self.entries = json.load(f)
        except (OSError, ValueError) as e:
            raise SearchError(f"image-search cache {path} cannot be read: {str(e)[:200]}") from e
        if not isinstance(self.entries, dict):
            raise SearchError(f"image-search cache {path} is not a JSON object keyed by sample index")
        self.root = os.path.dirname(os.path.abspath(path))

    def __call__(self, key):
        entry = self.entries.get(str(key))
        if not isinstance(entry, dict):
            return "Error: image search found nothing for this image.", []
        results = []
        for title, path in zip(entry.get("tool_returned_web_title") or [], entry.get("cached_images_path") or []):
            path = os.path.join(self.root, str(path))
            try:
                results.append((str(title), Image.open(path).convert("RGB")))
            except OSError:   # a listed image that is not there (the original skipped those too)
                continue
        return format_image_results(results[:MAX_IMAGES_PER_CALL])


# ================================================================================================ the sandbox, inside
# ---- the wire: length-prefixed JSON, then the images' raw pixels
class _ProtocolError(ValueError):
    """A session's reply that is not the answer to the call in flight."""


def _send(sock, obj, images=()):
    """One message: an 8-byte length, a JSON header, then the raw pixels of `images` (no PNG, no base64: fast)."""
    raw = [im.tobytes() for im in images]
    head = json.dumps(dict(obj, images=[dict(mode=im.mode, size=im.size, n=len(r)) for im, r in zip(images, raw)]))
    sock.sendall(b"".join([struct.pack("<Q", len(head)), head.encode(), *raw]))


def _recv(sock, from_session=False):
    """The inverse of _send. The host treats whatever a session sends as untrusted data: sizes are capped, and a
    malformed message raises (ValueError, KeyError, TypeError or RecursionError), never executes anything.
    from_session: the host reading a reply, which code in the session may have forged (it can read the call's
    nonce): every image is checked before a byte of it is read, as a real session would send it (at most
    MAX_IMAGES_PER_CALL, RGB / RGBA / L, 1..4096 pixels a side, exactly its pixels' bytes)."""
    n = struct.unpack("<Q", _recv_exact(sock, 8))[0]
    if n > MAX_MESSAGE:
        raise ValueError("sandbox message exceeds the size cap")
    obj = json.loads(_recv_exact(sock, n))
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list) or \
            sum(int(w["n"]) for w in obj["images"]) > MAX_MESSAGE:
        raise ValueError("malformed or oversized sandbox message")
    if from_session and (len(obj["images"]) > MAX_IMAGES_PER_CALL or not all(map(_sent_image_ok, obj["images"]))):
        raise _ProtocolError("images no session sends (count, mode, size or bytes)")
    obj["images"] = [Image.frombytes(w["mode"], tuple(w["size"]), _recv_exact(sock, int(w["n"])))
                     for w in obj["images"]]
    return obj


def _sent_image_ok(w):
    bands = {"RGB": 3, "RGBA": 4, "L": 1}.get(w.get("mode")) if isinstance(w, dict) else None
    size = w.get("size") if bands else None
    return isinstance(size, list) and len(size) == 2 and all(type(x) is int and 1 <= x <= 4096 for x in size) and \
        w.get("n") == size[0] * size[1] * bands


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("sandbox closed the connection")
        buf += chunk
    return bytes(buf)


# ---- inside the session process (forked from the zygote) ----
SECCOMP_DENY = ["fork", "vfork", "execve", "execveat", "tkill", "ptrace", "process_vm_readv", "process_vm_writev",
                "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "socket", "socketpair", "setns", "unshare", "mount",
                "umount2", "pivot_root", "chroot", "bpf", "perf_event_open", "keyctl", "add_key", "io_uring_setup",
                "mount_setattr", "open_tree", "move_mount", "fsopen", "fsmount", "fsconfig", "personality"]


def _seccomp(libc):
    """Refuse new processes (threads are fine), sockets, signals to others, and escape hatches. EPERM, not death."""
    sc = ctypes.CDLL("libseccomp.so.2")
    sc.seccomp_init.restype = ctypes.c_void_p
    sc.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
    sc.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                          ctypes.POINTER(Cmp)]
    ctx = sc.seccomp_init(0x7FFF0000)                      # default: allow
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38        # SCMP_ACT_ERRNO(EPERM / ENOSYS)
    nr = lambda name: sc.seccomp_syscall_resolve_name(name.encode())
    add = lambda act, name, *cmps: sc.seccomp_rule_add_array(ctx, act, nr(name), len(cmps), (Cmp * len(cmps))(*cmps)
                                                             if cmps else None)
    for name in SECCOMP_DENY:
        add(eperm, name)
    me = os.getpid()
    add(eperm, "kill", Cmp(0, 1, me, 0))                   # kill(pid != me): SCMP_CMP_NE
    add(eperm, "tgkill", Cmp(0, 1, me, 0))
    add(eperm, "clone", Cmp(0, 7, 0x00010000, 0))          # clone without CLONE_THREAD: SCMP_CMP_MASKED_EQ
    add(enosys, "clone3")                                  # flags hidden in a struct: make libc fall back to clone
    if sc.seccomp_load(ctypes.c_void_p(ctx)) != 0:
        raise OSError("seccomp_load failed")


def _lock_down(scratch, limits):
    """Namespaces, read-only file system, tmpfs scratch, no capabilities, seccomp, rlimits. Returns what held."""
    import resource
    libc = ctypes.CDLL(None, use_errno=True)
    got = {}
    flags = 0x40000000 | 0x00020000                        # CLONE_NEWNET | CLONE_NEWNS
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        flags |= 0x10000000                                # CLONE_NEWUSER: unprivileged users get namespaces this way
    got["namespaces"] = libc.unshare(flags) == 0
    if got["namespaces"] and uid != 0:
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                           ("/proc/self/gid_map", f"0 {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
    vm_now = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    if got["namespaces"]:
        class Attr(ctypes.Structure):
            _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64), ("prop", ctypes.c_uint64),
                        ("fd", ctypes.c_uint64)]
        ok = libc.mount(None, b"/", None, (1 << 14) | (1 << 18), None) == 0        # MS_REC | MS_PRIVATE
        ok = ok and libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(Attr(1, 0, 0, 0)), 32) == 0  # RDONLY, recursive
        ok = ok and libc.mount(b"tmpfs", scratch.encode(), b"tmpfs", 0,
                               f"size={limits['scratch_mb']}m,mode=0777".encode()) == 0
        got["read-only fs"] = ok
        got["/proc hidden"] = libc.mount(b"tmpfs", b"/proc", b"tmpfs", 1, b"size=4k") == 0
        got["network off"] = True
    os.chdir(scratch)
    for cap in range(64):                                  # drop every capability, for good
        libc.prctl(24, cap, 0, 0, 0)                       # PR_CAPBSET_DROP
    if uid == 0:   # the trainer runs as root: the model's code runs as nobody (root-only files like /etc/shadow)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    got["unprivileged"] = os.getuid() != 0 or uid != 0
    hdr, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    got["no capabilities"] = libc.capget(hdr, data) == 0 and libc.capset(hdr, (ctypes.c_uint32 * 6)()) == 0
    for res, value in ((resource.RLIMIT_AS, vm_now + (limits["memory_mb"] << 20)),
                       (resource.RLIMIT_CPU, limits["cpu_seconds"]),
                       (resource.RLIMIT_FSIZE, limits["scratch_mb"] << 20),
                       (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    try:
        _seccomp(libc)
        got["seccomp"] = True
    except OSError:
        got["seccomp"] = False
    return got


class _Bounded(io.StringIO):
    """A stdout that keeps the first `limit` characters and counts the rest (printing 100 MB costs nothing)."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.dropped = limit, 0

    def write(self, s):
        room = self.limit - self.tell()
        if room > 0:
            super().write(s[:room])
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def text(self):
        return self.getvalue() + (f"\n... [{self.dropped} more characters truncated]" if self.dropped else "")


def _session_main(sock, scratch, limits):
    """The notebook: exec each request in one persistent namespace, capture output and shown images."""
    import ast
    import traceback
    import matplotlib.pyplot as plt
    got = _lock_down(scratch, limits)
    shown = []

    def display(*objs):
        for obj in objs:
            if isinstance(obj, Image.Image):
                shown.append(obj.copy())
            elif hasattr(obj, "savefig"):   # a matplotlib figure
                obj.canvas.draw()
                shown.append(Image.frombuffer("RGBA", obj.canvas.get_width_height(), obj.canvas.buffer_rgba()).copy())
            else:
                print(repr(obj))

    def show(*a, **k):
        for num in plt.get_fignums():
            display(plt.figure(num))
        plt.close("all")
    plt.show = show
    Image.Image.show = lambda self, *a, **k: display(self)
    namespace = {"__name__": "__main__", "display": display}
    def on_alarm(*_):
        raise TimeoutError(f"code execution exceeded {limits['timeout']} s; the session goes on")
    signal.signal(signal.SIGALRM, on_alarm)
    _send(sock, {"protections": got})
    while True:
        try:
            req = _recv(sock)
        except EOFError:
            os._exit(0)
        if "code" not in req:   # the first message: the sample's images
            namespace.update({f"image_{i}": im for i, im in enumerate(req["images"], 1)})
            _send(sock, {"ok": True})
            continue
        out, err = _Bounded(OUTPUT_LIMIT), _Bounded(OUTPUT_LIMIT)
        shown.clear()
        plt.close("all")   # figures a timed-out call left open would come back at every later show()
        sys.stdout, sys.stderr = out, err
        try:
            tree = ast.parse(req["code"])
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            signal.alarm(limits["timeout"])
            exec(compile(tree, "<code>", "exec"), namespace)
            if last is not None:   # like a notebook cell: show the value of a final expression
                value = eval(compile(ast.Expression(last.value), "<code>", "eval"), namespace)
                if value is not None:
                    display(value)
        except SyntaxError:
            err.write(traceback.format_exc(limit=0))
        except BaseException:     # the user's exception, SystemExit and KeyboardInterrupt included
            etype, evalue, tb = sys.exc_info()
            err.write("".join(traceback.format_exception(etype, evalue, tb.tb_next)))
        finally:
            signal.alarm(0)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        err.write(_stop_stray_threads())
        images = shown[:MAX_IMAGES_PER_CALL]
        if len(shown) > len(images):
            err.write(f"\n[{len(shown) - len(images)} images dropped: at most {MAX_IMAGES_PER_CALL} per call]")
        if not all(im.width and im.height for im in images):
            err.write("\n[an empty image (0 pixels wide or high) cannot be shown]")
            images = [im for im in images if im.width and im.height]
        for i, im in enumerate(images):   # bounded in size, in a mode the host can rebuild
            images[i] = im if im.mode in ("RGB", "RGBA", "L") else im.convert("RGB")
            images[i].thumbnail((4096, 4096))
        _send(sock, {"stdout": out.text(), "stderr": err.text(), "nonce": req["nonce"]}, images)


def _stop_stray_threads(wait=0.5):
    """Stop the threads a call left running (a busy one would burn the session's CPU budget between calls): raise
    SystemExit inside each. -> a note for stderr, or "" when the call started none."""
    strays = [t for t in threading.enumerate() if t is not threading.main_thread()]
    for t in strays:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(SystemExit))
    deadline = time.time() + wait
    for t in strays:
        t.join(max(0.0, deadline - time.time()))
    stuck = sum(t.is_alive() for t in strays)   # blocked in C code, beyond reach until it returns
    return (f"\n[{len(strays)} threads the code started were stopped when the call ended" +
            (f"; {stuck} blocked in C code could not be]" if stuck else "]")) if strays else ""


def _zygote_main(ctl_fd):
    """Preload the libraries once, then fork one session per request received on the control socket."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 -- preloaded so sessions start fast
    for name in PRELOAD:      # the original sandbox's libraries: imported once here, so a session's import is free
        try:
            __import__(name)
        except ImportError:   # not installed: the model's import fails in its session and it reads why
            pass
    try:   # scikit-learn finds its thread pools once, in /proc/self/maps, which a session cannot read: do it here
        from sklearn.utils.parallel import _get_threadpool_controller
        _get_threadpool_controller()
    except ImportError:
        pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)        # sessions are reaped by the kernel
    ctl = socket.socket(fileno=ctl_fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 1 << 16, 1)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)
        req = json.loads(msg)
        pid = os.fork()
        if pid == 0:
            ctl.close()
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            try:
                _session_main(socket.socket(fileno=fds[0]), req["scratch"], req["limits"])
            finally:
                os._exit(1)
        os.close(fds[0])
        ctl.sendall(struct.pack("<q", pid))


class _Zygote:
    """One per host process, started on first use, shared by all sessions (spawning is serialised by a lock)."""
    lock, proc, ctl = threading.Lock(), None, None

    @classmethod
    def spawn(cls, child_sock, scratch, limits):
        with cls.lock:
            if cls.proc is None or cls.proc.poll() is not None:
                cls.ctl, theirs = socket.socketpair()
                mpl = os.path.join(CACHE_DIR, "matplotlib")
                os.makedirs(mpl, exist_ok=True)
                env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent", "MPLBACKEND": "Agg",
                       "MPLCONFIGDIR": mpl, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE,
                       "PYTHONDONTWRITEBYTECODE": "1"}
                cls.proc = subprocess.Popen(
                    [sys.executable, "-c", f"import tools; tools._zygote_main({theirs.fileno()})"],
                    pass_fds=[theirs.fileno()], env=env, cwd=HERE, start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                theirs.close()
            socket.send_fds(cls.ctl, [json.dumps({"scratch": scratch, "limits": limits}).encode()],
                            [child_sock.fileno()])
            return struct.unpack("<q", _recv_exact(cls.ctl, 8))[0]


# ---- the embedded backend: BM25 over a JSONL corpus, nearest neighbour over an image folder ----
def tokenize_words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


class BM25:
    """Okapi BM25 (k1=1.5, b=0.75) over documents with a title and a text, in plain numpy."""

    def __init__(self, docs, k1=1.5, b=0.75):
        self.docs = docs
        toks = [tokenize_words(d.get("title", "") + " " + d.get("text", "")) for d in docs]
        self.vocab = {w: i for i, w in enumerate(sorted({w for t in toks for w in t}))}
        self.tf = np.zeros((len(docs), len(self.vocab)), dtype=np.float32)
        for i, t in enumerate(toks):
            for w in t:
                self.tf[i, self.vocab[w]] += 1
        df = (self.tf > 0).sum(0)
        self.idf = np.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        lens = self.tf.sum(1, keepdims=True)
        self.norm = k1 * (1 - b + b * lens / max(lens.mean(), 1))
        self.k1 = k1

    def search(self, query, k=5):
        cols = [self.vocab[w] for w in set(tokenize_words(query)) if w in self.vocab]
        if not cols:
            return []
        tf = self.tf[:, cols]
        scores = (self.idf[cols] * tf * (self.k1 + 1) / (tf + self.norm)).sum(1)
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.docs[i] for i in order if scores[i] > 0]


def image_embedding(img):
    """A simple, robust image signature: a 12x12 colour thumbnail, mean-centred and unit-normalised."""
    v = np.asarray(img.convert("RGB").resize((12, 12), Image.BILINEAR), dtype=np.float32).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) + 1e-6)


class SearchIndex:
    """Text corpus (JSONL: title, text, link[, date]) and image index (JSONL: title, image path) for `serve`."""

    def __init__(self, corpus, image_index=None, min_image_score=-1.0):
        self.min_image_score = min_image_score   # a reverse image search returns matches, not the nearest of anything
        with open(corpus) as f:
            self.bm25 = BM25([json.loads(line) for line in f if line.strip()])
        self.images = []
        if image_index and os.path.exists(image_index):
            root = os.path.dirname(os.path.abspath(image_index))
            with open(image_index) as f:
                self.images = [json.loads(line) for line in f if line.strip()]
            embeddings = []
            for r in self.images:   # each file read once, here: a query then only ranks and returns
                with open(os.path.join(root, r["image"]), "rb") as f:
                    raw = f.read()
                r["image_b64"] = base64.b64encode(raw).decode()
                embeddings.append(image_embedding(Image.open(io.BytesIO(raw))))
            self.emb = np.stack(embeddings)

    def text(self, q, k):
        return [dict(title=d.get("title", ""), link=d.get("link", ""), snippet=d.get("text", ""),
                     **({"date": d["date"]} if d.get("date") else {})) for d in self.bm25.search(q, k)]

    def image(self, img, k):
        if not self.images:
            return []
        scores = self.emb @ image_embedding(img)
        order = np.argsort(-scores, kind="stable")[:k]
        return [dict(title=self.images[i]["title"], image_b64=self.images[i]["image_b64"])
                for i in order[scores[order] >= self.min_image_score]]


MAX_RESULTS = 50   # the most results one request may ask for (Serper's own cap is 100)


def make_server(index, host="127.0.0.1", port=8765, timeout=30, max_connections=64):
    """An HTTP server answering POST /search and POST /lens with Serper-shaped JSON. Loopback only by default.
    Every bad request gets a 400. A connection has `timeout` seconds in all, however slowly its client writes (a
    watchdog closes it then); at most `max_connections` are served at once, and one more is answered 503 at once
    (stalled or aborted connections cannot pile up threads); a failed connection logs one line, no traceback."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def setup(self):
            super().setup()
            self.connection.settimeout(timeout)
            self.deadline = threading.Timer(timeout, self.cut)
            self.deadline.start()

        def cut(self):   # the whole request's deadline: unblocks any read or write in flight
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def finish(self):
            self.deadline.cancel()
            try:
                super().finish()
            except OSError:   # the client went away before its answer was flushed
                pass

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length", 0))
                if not 0 <= length <= MAX_MESSAGE:
                    raise ValueError("bad Content-Length")
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                k = body.get("num", 5)
                if isinstance(k, bool) or not isinstance(k, (int, float)) or not k >= 1:
                    raise ValueError("num must be a number >= 1")
                k = int(min(k, MAX_RESULTS))
                if self.path == "/search":
                    if not isinstance(body.get("q"), str) or not body["q"].strip():
                        raise ValueError("q must be a non-empty string")
                    out = {"organic": index.text(body["q"], k)}
                elif self.path == "/lens":
                    img = Image.open(io.BytesIO(base64.b64decode(str(body["image_b64"]))))
                    out = {"organic": index.image(img, k)}
                else:
                    return self.send_error(404)
            except (KeyError, ValueError, TypeError, OSError, RecursionError, Image.DecompressionBombError) as e:
                return self.send_error(400, str(e)[:200])
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128   # the listen backlog (socketserver's 5 reset ~0.1% of connections at 16 clients)
        daemon_threads = True
        slots = threading.BoundedSemaphore(max_connections)

        def process_request(self, request, client_address):
            if not self.slots.acquire(blocking=False):   # every slot busy: say so now, hold no thread
                try:
                    request.settimeout(1)
                    request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass
                return self.shutdown_request(request)
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request, client_address):
            print(f"search server: {client_address[0]}: {sys.exc_info()[1]!r}"[:300], file=sys.stderr)

    return Server((host, port), Handler)


def start_server_thread(corpus, image_index=None, port=0, min_image_score=-1.0):
    """Serve in a daemon thread (tests, the miniature pipeline); returns its base URL."""
    server = make_server(SearchIndex(corpus, image_index, min_image_score), "127.0.0.1", port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


# ================================================================================================ bench / CLI
def bench(n_parallel=16, repeats=20):
    """Session start, warm calls and parallel sessions, each against a fresh `python -c` per call, same run."""
    from concurrent.futures import ThreadPoolExecutor
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8))
    crop = "image_1.crop((100, 100, 400, 400)).resize((600, 600)).show()"
    Sandbox([img]).close()                                     # start the zygote (once per process, not per session)
    med = lambda f: sorted(f() for _ in range(repeats))[repeats // 2]

    def timed(fn):
        t = time.perf_counter(); fn(); return time.perf_counter() - t

    def fresh(code):   # the naive way: a new interpreter per call that loads the image from disk
        path = os.path.join(tempfile.gettempdir(), "deepeyes_bench.png")
        if not os.path.exists(path):
            img.save(path)
        pre = f"from PIL import Image; import matplotlib; matplotlib.use('Agg'); image_1 = Image.open('{path}'); "
        code = code.replace(".show()", ".save('/dev/null', 'PNG', compress_level=1)")
        subprocess.run([sys.executable, "-c", pre + code],
                       check=True, stdout=subprocess.DEVNULL)

    sb = Sandbox([img])
    rows = [("session start (fork + lock-down + image)", med(lambda: timed(lambda: Sandbox([img]).close())),
             med(lambda: timed(lambda: fresh("pass")))),
            ("warm call: print", med(lambda: timed(lambda: sb.run("print(1)"))),
             med(lambda: timed(lambda: fresh("print(1)")))),
            ("warm call: crop + show 1024px", med(lambda: timed(lambda: sb.run(crop))),
             med(lambda: timed(lambda: fresh(crop))))]
    sb.close()

    def session(_):
        with Sandbox([img]) as s:
            for _ in range(4):
                assert s.run(crop)["images"]

    with ThreadPoolExecutor(n_parallel) as pool:
        t = time.perf_counter(); list(pool.map(session, range(n_parallel))); ours = time.perf_counter() - t
        t = time.perf_counter(); list(pool.map(lambda _: [fresh(crop) for _ in range(4)], range(n_parallel)))
        rows.append((f"{n_parallel} parallel sessions x 4 crop calls", ours, time.perf_counter() - t))
    print(f"{'case':44s} {'sandbox ms':>11s} {'fresh ms':>10s} {'speed-up':>9s}")
    for name, a, b in rows:
        print(f"{name:44s} {a * 1e3:11.2f} {b * 1e3:10.2f} {b / a:8.1f}x")
    print(json.dumps({"start_ms": round(rows[0][1] * 1e3, 2), "print_ms": round(rows[1][1] * 1e3, 3),
                      "crop_ms": round(rows[2][1] * 1e3, 2), "print_speedup": round(rows[1][2] / rows[1][1], 1),
                      "crop_speedup": round(rows[2][2] / rows[2][1], 1), "parallel_s": round(rows[3][1], 2),
                      "parallel_speedup": round(rows[3][2] / rows[3][1], 1)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=["serve"], help="serve: run the local search backend")
    ap.add_argument("--bench", action="store_true", help="measure the sandbox against a fresh process per call")
    ap.add_argument("--corpus", default=os.path.join(HERE, "data", "corpus.jsonl"),
                    help="serve: JSONL text corpus with title, text, link[, date]")
    ap.add_argument("--images", default=os.path.join(HERE, "data", "image_index.jsonl"),
                    help="serve: JSONL image index with title and image path (relative to the file)")
    ap.add_argument("--host", default="127.0.0.1", help="serve: address to bind (keep loopback unless you mean it)")
    ap.add_argument("--port", type=int, default=8765, help="serve: port")
    ap.add_argument("--min-image-score", type=float, default=-1.0, help="serve: drop image matches below this cosine "
                    "similarity of the image signatures (-1: always the k nearest; the miniature world uses 0.95)")
    args = ap.parse_args()
    if args.bench:
        return bench()
    if args.command == "serve":
        if not os.path.exists(args.corpus):
            sys.exit(f"error: corpus {args.corpus} not found (python data/world.py builds one)")
        server = make_server(SearchIndex(args.corpus, args.images, args.min_image_score), args.host, args.port)
        print(f"search backend on http://{args.host}:{args.port} (corpus {args.corpus})", flush=True)   # ready now
        return server.serve_forever()
    ap.print_help()


if __name__ == "__main__":
    main()
