"""support/sandbox.py -- how the sandbox isolates the model's code: the part of tools.Sandbox a first reading skips.

tools.py holds the sandbox as the model sees it (`Sandbox.run(code)`, and `tools.notebook`, the loop that runs a
cell in one persistent namespace and returns its output and images). This module holds what keeps that code in its
box, all of it Linux systems programming:
  - the wire protocol between host and session: length-prefixed JSON plus raw pixels, never pickle, sizes capped,
    and (host side) every image of a reply checked before a byte of it is read (`recv(..., from_session=True)`);
  - `lock_down`: new network and mount namespaces (no network, a read-only file system, /proc hidden, a size-capped
    tmpfs as the only writable place), uid 65534 when started by root, every capability dropped, a seccomp filter
    (no new processes, sockets, signals to others, ptrace, mount, namespaces), rlimits on memory, CPU seconds, file
    size and open files;
  - the zygote: one process per host that imports the heavy libraries once and forks a session per request, so a
    session starts in milliseconds with numpy, cv2, scipy, pandas, sympy and scikit-learn already imported;
  - `Bounded` output and `stop_stray_threads` (threads a call leaves running are stopped when it ends).
"""
import ctypes
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from PIL import Image

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: sessions import from it
MAX_MESSAGE = 64 << 20       # the largest reply the host accepts from a session
MAX_IMAGES_PER_CALL = 10
# What the original's sandbox offered the model's code besides numpy, PIL and matplotlib (ChenShawn/MultiModal-
# Jupyter-Sandbox, requirements.txt: opencv, scipy, pandas, sympy, scikit-learn, seaborn): released trajectories
# import them, and an ImportError would turn a good trajectory into a failed one. Preloaded in the zygote: a session
# forks with them already imported. Its pytesseract and easyocr are importable here when installed (README).
PRELOAD = ["numpy", "cv2", "scipy.ndimage", "scipy.signal", "pandas", "sympy", "sklearn.cluster", "seaborn"]


class SandboxError(RuntimeError):
    """Infrastructure failure (the sandbox could not start or answer): counted, never scored."""


WARNED = []


def check_protections(got):
    """Raise SandboxError if a session could not isolate itself, unless DEEPEYES_UNSAFE_SANDBOX=1: then say loudly
    (once) what is missing."""
    missing = [k for k in ("namespaces", "read-only fs", "/proc hidden", "no capabilities", "seccomp",
                           "unprivileged") if not got.get(k)]
    if not missing:
        return
    if os.environ.get("DEEPEYES_UNSAFE_SANDBOX") != "1":
        raise SandboxError(f"sandbox cannot isolate code here (missing: {', '.join(missing)}); enable unprivileged "
                           "user namespaces or run as root, or set DEEPEYES_UNSAFE_SANDBOX=1 to run model code "
                           "WITHOUT these protections")
    if not WARNED:
        WARNED.append(True)
        print(f"WARNING: sandbox running WITHOUT: {', '.join(missing)} (DEEPEYES_UNSAFE_SANDBOX=1)", file=sys.stderr)


# ---- the wire: length-prefixed JSON, then the images' raw pixels
class ProtocolError(ValueError):
    """A session's reply that is not the answer to the call in flight."""


def send(sock, obj, images=()):
    """One message: an 8-byte length, a JSON header, then the raw pixels of `images` (no PNG, no base64: fast)."""
    raw = [im.tobytes() for im in images]
    head = json.dumps(dict(obj, images=[dict(mode=im.mode, size=im.size, n=len(r)) for im, r in zip(images, raw)]))
    sock.sendall(b"".join([struct.pack("<Q", len(head)), head.encode(), *raw]))


def recv(sock, from_session=False):
    """The inverse of send. The host treats whatever a session sends as untrusted data: sizes are capped, and a
    malformed message raises (ValueError, KeyError, TypeError or RecursionError), never executes anything.
    from_session: the host reading a reply, which code in the session may have forged (it can read the call's
    nonce): every image is checked before a byte of it is read, as a real session would send it (at most
    MAX_IMAGES_PER_CALL, RGB / RGBA / L, 1..4096 pixels a side, exactly its pixels' bytes)."""
    n = struct.unpack("<Q", recv_exact(sock, 8))[0]
    if n > MAX_MESSAGE:
        raise ValueError("sandbox message exceeds the size cap")
    obj = json.loads(recv_exact(sock, n))
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list) or \
            sum(int(w["n"]) for w in obj["images"]) > MAX_MESSAGE:
        raise ValueError("malformed or oversized sandbox message")
    if from_session and (len(obj["images"]) > MAX_IMAGES_PER_CALL or not all(map(sent_image_ok, obj["images"]))):
        raise ProtocolError("images no session sends (count, mode, size or bytes)")
    obj["images"] = [Image.frombytes(w["mode"], tuple(w["size"]), recv_exact(sock, int(w["n"])))
                     for w in obj["images"]]
    return obj


def sent_image_ok(w):
    bands = {"RGB": 3, "RGBA": 4, "L": 1}.get(w.get("mode")) if isinstance(w, dict) else None
    size = w.get("size") if bands else None
    return isinstance(size, list) and len(size) == 2 and all(type(x) is int and 1 <= x <= 4096 for x in size) and \
        w.get("n") == size[0] * size[1] * bands


def recv_exact(sock, n):
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


def seccomp(libc):
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


def lock_down(scratch, limits):
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
        seccomp(libc)
        got["seccomp"] = True
    except OSError:
        got["seccomp"] = False
    return got


class Bounded(io.StringIO):
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


def stop_stray_threads(wait=0.5):
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


def zygote_main(ctl_fd, session):
    """Preload the libraries once, then fork one session per request received on the control socket; the child
    runs session(sock, scratch, limits) (tools.notebook), which locks itself down first."""
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
                session(socket.socket(fileno=fds[0]), req["scratch"], req["limits"])
            finally:
                os._exit(1)
        os.close(fds[0])
        ctl.sendall(struct.pack("<q", pid))


class Zygote:
    """One per host process, started on first use, shared by all sessions (spawning is serialised by a lock)."""
    lock, proc, ctl = threading.Lock(), None, None

    @classmethod
    def spawn(cls, child_sock, scratch, limits):
        with cls.lock:
            if cls.proc is None or cls.proc.poll() is not None:
                cls.ctl, theirs = socket.socketpair()
                mpl = os.path.join(os.environ.get("DEEPEYES_CACHE", os.path.expanduser("~/.cache/deepeyesv2")),
                                   "matplotlib")
                os.makedirs(mpl, exist_ok=True)
                env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent", "MPLBACKEND": "Agg",
                       "MPLCONFIGDIR": mpl, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE,
                       "PYTHONDONTWRITEBYTECODE": "1"}
                start = f"import tools, support.sandbox as s; s.zygote_main({theirs.fileno()}, tools.notebook)"
                cls.proc = subprocess.Popen(
                    [sys.executable, "-c", start],
                    pass_fds=[theirs.fileno()], env=env, cwd=HERE, start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                theirs.close()
            socket.send_fds(cls.ctl, [json.dumps({"scratch": scratch, "limits": limits}).encode()],
                            [child_sock.fileno()])
            return struct.unpack("<q", recv_exact(cls.ctl, 8))[0]


