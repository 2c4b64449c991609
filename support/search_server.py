"""support/search_server.py -- a local search backend that answers as Serper does (tests and the miniature world).

`python -m support.search_server` serves POST /search (BM25 over a JSONL text corpus) and POST /lens (nearest
neighbour over an image index) on 127.0.0.1, in the JSON shape of the Serper API the original called, so that
tools.text_search / tools.image_search run unchanged against it. At full scale you point DEEPEYES_SEARCH_URL at a
real Serper-compatible service instead. It is hardened for being hammered by a rollout: at most `max_connections`
served at once (one more gets 503 at once), a whole-request deadline, 400 for every bad request, one log line a
failure.
"""
import argparse
import base64
import io
import json
import os
import re
import socket
import sys
import threading

import numpy as np
from PIL import Image

from support.sandbox import MAX_MESSAGE

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=os.path.join(HERE, "data", "corpus.jsonl"),
                    help="JSONL text corpus with title, text, link[, date]")
    ap.add_argument("--images", default=os.path.join(HERE, "data", "image_index.jsonl"),
                    help="JSONL image index with title and image path (relative to the file)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (keep loopback unless you mean it)")
    ap.add_argument("--port", type=int, default=8765, help="port")
    ap.add_argument("--min-image-score", type=float, default=-1.0, help="drop image matches below this cosine "
                    "similarity of the image signatures (-1: always the k nearest; the miniature world uses 0.95)")
    args = ap.parse_args()
    if not os.path.exists(args.corpus):
        sys.exit(f"error: corpus {args.corpus} not found (python data/world.py builds one)")
    server = make_server(SearchIndex(args.corpus, args.images, args.min_image_score), args.host, args.port)
    print(f"search backend on http://{args.host}:{args.port} (corpus {args.corpus})", flush=True)   # ready now
    server.serve_forever()


if __name__ == "__main__":
    main()
