"""support/fast_decode.py -- the rollout's decode, fast: one CUDA graph over preallocated KV slots (a GPU), and a
KV cache that grows in place (the plain decode's, a CPU).

rollout.decode_turns needs one thing a step: given the token each live row just sampled, the next-token logits of
every row. `StaticKV` computes it with a Qwen2 decode step written against the model's own weights over
preallocated K/V buffers (a slot a row), so that on a GPU the whole step is one replayed CUDA graph: HF's forward
cost ~30 ms of Python per 7B decode step, more than the GPU's own work (README: 13.5 ms a step against 31.9 on an
H200). `test_static_decode_equals_the_models_forward` pins its logits to the model's own forward, and the rollout's
log-probs to the training forward's. `STATS` counts decode steps, the cached tokens their attention read, and the
seconds spent capturing graphs (the bench reads them).
"""
from collections import Counter
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

STATS = Counter()


# ------------------------------------------------------------------------------------ the plain decode's cache
class GrowingLayer(DynamicLayer):
    """HF's DynamicLayer concatenates at every update: each decoded token copies the whole cache (on a CPU the plain
    decode's largest cost, `aten::cat`). This layer writes into room kept behind its keys (SPARE more tokens, made
    again when used up, or when a caller replaced the keys, as `PlainKV.keep` does) and returns views of it: the same
    values, so the same logits, bit for bit (test_growing_cache_decodes_bit_for_bit_as_the_concatenating_one)."""
    SPARE = 128

    def update(self, keys, values, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        n, new = self.get_seq_length(), keys.shape[2]
        room = getattr(self, "room", None)
        if room is None or n + new > room[0].shape[2] or room[0].data_ptr() != self.keys.data_ptr() \
                or room[0].shape[:2] != keys.shape[:2]:
            shape = (*keys.shape[:2], n + new + self.SPARE, keys.shape[3])
            room = self.room = (keys.new_empty(shape), values.new_empty(shape))
            if n:
                room[0][:, :, :n], room[1][:, :, :n] = self.keys, self.values
        room[0][:, :, n:n + new], room[1][:, :, n:n + new] = keys, values
        self.keys, self.values = room[0][:, :, :n + new], room[1][:, :, :n + new]
        return self.keys, self.values


def growing_cache(kvs):
    """A DynamicCache of GrowingLayers holding the per-layer (keys, values) `kvs`."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer() for _ in kvs]
    for layer, (k, v) in zip(cache.layers, kvs):
        layer.update(k, v)
    return cache


# ------------------------------------------------------------------------------------------- the decode batch's KV
class StaticKV:
    """The fast decode: one new token per row, written against the model's weights over preallocated KV buffers
    (a slot per row, [slots, kv_heads, capacity, head_dim] per layer), so that on a GPU the whole step is one
    replayed CUDA graph. HF's forward cost ~30 ms of Python per 7B decode step, more than the GPU's own ~10 ms (a
    profile at 64 rows on an H100); a graph replay costs ~0 (README: 13.5 ms a step against 31.9 on an H200).

    Static shapes: graphs are captured per batch bucket (a power of two of slots); a row that ends keeps its slot
    (computed, ignored) until the live rows fit half the bucket, then the live slots move to the front. Capacity
    grows by 1.5x when a row reaches it (the graphs are captured again). A graph's attention reads the whole
    capacity, masked (at most a third wasted, and no kernel of its own); eager (CPU) reads up to the longest row.
    Decoding text, M-RoPE's three positions are equal, which is plain RoPE at that position
    (test_static_decode_equals_the_models_forward pins all of it)."""

    def __init__(self, model):
        lm = model.model.language_model
        self.model, self.lm, self.att = model, lm, lm.layers[0].self_attn
        self.graphs = torch.cuda.is_available() and next(model.parameters()).is_cuda
        self.slots, self.cap, self.kv, self.tok = 0, 0, None, None

    def load(self, trajs):
        """Each turn: the rows' caches into slots [0, n). The buffers (and so the graphs) live across turns."""
        n = len(trajs)
        self.top = max(t.cached for t in trajs)          # >= every slot's length (host copy: no sync to read it)
        if self.bucket(n) > self.slots or self.top + 1 >= self.cap:
            self.slots = max(self.slots, self.bucket(n))
            self.kv = None   # not copied: every live row is loaded below
            self.allocate(self.top + 1)
        # the graphs read these very tensors: written in place, never replaced
        self.pos.copy_(torch.tensor([t.next_pos for t in trajs] + [0] * (self.slots - n)))
        self.len.copy_(torch.tensor([t.cached for t in trajs] + [0] * (self.slots - n)))
        self.set_live(list(range(n)))
        self.rows_len = [t.cached for t in trajs]   # host copies, for STATS only
        for s, t in enumerate(trajs):
            for (k, v), (K, V) in zip(t.cache, self.kv):
                K[s, :, :t.cached], V[s, :, :t.cached] = k[0], v[0]

    def bucket(self, n):   # eager (CPU) runs exactly the live rows; graphs want few distinct shapes
        return 1 << (n - 1).bit_length() if self.graphs else n

    def allocate(self, need):
        a, p = self.att, next(self.model.parameters())
        self.cap = max(256, -(-int(need * 1.5) // 256) * 256)
        old = self.kv
        shape = (self.slots, a.config.num_key_value_heads, self.cap, a.head_dim)
        self.kv = [(p.new_zeros(shape), p.new_zeros(shape)) for _ in self.lm.layers]
        if self.tok is None or len(self.tok) != self.slots:
            self.tok, self.pos, self.len = (torch.zeros(self.slots, dtype=torch.long, device=p.device) for _ in "tpl")
        if old:
            for (K, V), (k, v) in zip(self.kv, old):
                K[:, :, :k.shape[2]], V[:, :, :v.shape[2]] = k, v
        self.captured = {}

    def forward(self, b):
        """The decode step for slots [0, b): token tok at position pos, its K/V written at index len."""
        x = self.lm.embed_tokens(self.tok[:b])
        rope = self.lm.rotary_emb
        freqs = self.pos[:b, None].float() * rope.inv_freq.float()
        emb = torch.cat([freqs, freqs], -1)[:, None, None, :]
        cos, sin = (emb.cos() * rope.attention_scaling).to(x.dtype), (emb.sin() * rope.attention_scaling).to(x.dtype)
        rot = lambda t: t * cos + torch.cat([-t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]], -1) * sin
        at = self.len[:b]
        span = self.cap if self.graphs else self.top + 1   # a graph's shapes are fixed; eager reads only what is used
        mask = (torch.arange(span, device=x.device) <= at[:, None])[:, None, None, :]   # its past and itself
        kvh, hd = self.kv[0][0].shape[1], self.att.head_dim
        where = at.view(b, 1, 1, 1).expand(b, kvh, 1, hd)
        for layer, (K, V) in zip(self.lm.layers, self.kv):
            a, h = layer.self_attn, layer.input_layernorm(x)
            # a query head's group shares one K/V head: [b, kv_heads, group, hd] against [b, kv_heads, cap, hd]
            q = rot(a.q_proj(h).view(b, kvh, -1, hd))
            K[:b].scatter_(2, where, rot(a.k_proj(h).view(b, kvh, 1, hd)))
            V[:b].scatter_(2, where, a.v_proj(h).view(b, kvh, 1, hd))
            o = F.scaled_dot_product_attention(q, K[:b, :, :span], V[:b, :, :span], attn_mask=mask, scale=a.scaling)
            x = x + a.o_proj(o.reshape(b, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.lm.norm(x))

    def run(self, b):
        if not self.graphs:
            return self.forward(b)
        if b not in self.captured:   # warm up on a side stream, then capture (writes only the slots' next K/V)
            t0 = time.perf_counter()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.forward(b)
            self.captured[b] = (graph, out)
            torch.cuda.synchronize()
            STATS["capture_s"] += time.perf_counter() - t0
        graph, out = self.captured[b]
        graph.replay()
        return out

    def step(self, token):
        if self.top + 1 >= self.cap:
            self.allocate(self.top + 1)
        STATS["steps"] += 1
        STATS["kv_tokens"] += sum(self.rows_len) + len(self.rows_len)
        self.rows_len = [n + 1 for n in self.rows_len]
        b = self.bucket(self.live[-1] + 1)   # live slots stay in increasing order
        self.tok[self.live_idx] = token
        logits = self.run(b)[self.live_idx]
        self.len[:b] += 1
        self.pos[:b] += 1
        self.top += 1
        return logits

    def set_live(self, slots):
        """The slot of each live row, and the same as a tensor (made when rows leave, not at every step)."""
        self.live, self.live_idx = slots, torch.tensor(slots, device=self.tok.device, dtype=torch.long)

    def keep(self, rows):
        self.rows_len = [self.rows_len[r] for r in rows]
        self.set_live([self.live[r] for r in rows])
        if rows and self.bucket(len(rows)) < self.bucket(self.live[-1] + 1):   # compact: live slots to the front
            idx = self.live_idx
            for K, V in self.kv:
                K[:len(rows)], V[:len(rows)] = K[idx], V[idx]
            self.len[:len(rows)], self.pos[:len(rows)] = self.len[idx], self.pos[idx]
            self.set_live(list(range(len(rows))))
        dead = sorted(set(range(self.slots)) - set(self.live))
        self.len[dead] = 0   # a dead slot writes from 0 on: it never outgrows `top`, the longest row's bound

    def row_cache(self, r, n):   # a copy: the slot's buffer is written again
        s = self.live[r]
        return [(K[s:s + 1, :, :n].clone(), V[s:s + 1, :, :n].clone()) for K, V in self.kv]


