"""rollout.py -- the agent loop: a model becomes an agent that thinks, calls tools, reads, answers.

One loop serves RL (grpo.py, sampled) and evaluation (eval.py, greedy). A round: the active
trajectories prefill their pending tokens (the prompt, or the last observation) into their own KV
caches; they decode together until each has ended its turn (the close of a call the prompt offers,
or `<|im_end|>`); their tools run concurrently; each observation is appended in the original's
token format (data/PROTOCOL.md), as sft.py encodes it too.

Deliberate choices:
- Prefill and decode are the model's own forward, M-RoPE positions passed explicitly. A GPU runs
  the same decode step as one CUDA graph (support/fast_decode.py; a test pins the two together).
- A GRPO group's prompt and image are prefilled once; a trajectory keeps its KV cache across turns.
- Rounds are synchronous: a turn that ended early waits for the round's longest (simpler than
  continuous batching). The policy never emits `<|im_start|>` or vision tokens (as the original).
- A tool backend failure (sandbox or search down) is an observation the model can go on from,
  counted in `Trajectory.infra_errors`, never scored as a wrong answer (`on_infra_error="end"`
  ends the episode, as the original did). With `tools_on=False` a call is refused so too.
Speed: `python -m support.bench rollout` (tok/s against model.generate one at a time; README).
"""
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import tools
from model import (RL_MAX_PIXELS, Seq, closing_tokens, encode, encode_plain, forward_cached,
                   prepare_image, rope_positions, stack_caches)
from support.fast_decode import StaticKV
from tools import IMAGE_PLACEHOLDER

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prompts")
PROMPT_SETS = ("agent", "code", "direct")   # code + both searches / code only / no tools
TOOLS_OFF = "Error: tools are disabled in this run; answer from what you already know and see."
OBS_PREFIX = "<|im_end|>\n<|im_start|>user\n"              # closes the turn, opens a user turn
OBS_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>"   # ... and pre-fills the next <think>
STOP_WINDOW = len("</tool_call>")   # tokens to decode for the stop check: a token is >= 1 character
BANNED = ("<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
          "<|image_pad|>", "<|video_pad|>")


@dataclass
class Sample:
    images: list                  # PIL images, image_1 .. image_n
    question: str
    answer: str = ""
    data_source: str = "reason"   # perception | reason | search: which judge; the search cost
    id: str = ""                  # the RL row's extra_info.index: the image-search cache's key
    prompt: list = None           # the chat messages a released RL row was trained with


@dataclass
class Trajectory:
    sample: Sample
    seq: Seq                 # every token (prompt, model turns, observations), every image
    prompt_len: int
    action_mask: list        # 1 exactly on model-sampled tokens
    logprobs: list           # the sampler's log-prob of each sampled token (0 elsewhere)
    turns: int = 0
    calls: Counter = field(default_factory=Counter)   # code / search / image_search / error
    finish: str = ""         # answer, no_action, max_turns, turn_tokens, budget, ...
    infra_errors: int = 0
    obs_images: list = field(default_factory=list)    # tool outputs' images (keep_images only)
    response: str = ""       # decoded response (tool outputs included), what the reward reads
    reward: dict = field(default_factory=dict)
    # rollout-internal state
    cache: list = None       # per layer (k, v) of shape [1, H, T, D], covering seq.ids[:cached]
    cached: int = 0
    cached_images: int = 0
    next_pos: int = 0        # M-RoPE position of the next token (set by prefill)
    turn_ids: list = field(default_factory=list)
    forced: list = field(default_factory=list)
    answer = property(lambda self: tools.extract_answer(self.response))


@dataclass
class Prompt:
    """A system prompt and a user template: `{question}` is the question; the first "<image>" is
    where the images go (none: they open the user turn, as VLMEvalKit's messages put them)."""
    system: str
    user: str = "{question}"
    tools: tuple = ("code", "search", "image_search")   # the code prompt offers code only

    @property
    def stops(self):
        """A model turn ends at the close of a call the prompt offers (or at <|im_end|>)."""
        return (("</code>",) if "code" in self.tools else ()) + \
            (("</tool_call>",) if {"search", "image_search"} & set(self.tools) else ())

    def messages(self, sample):
        if sample.prompt:   # a released RL row carries the prompt it was trained with: as given
            return [dict(m, content=m["content"].replace("<image>", IMAGE_PLACEHOLDER))
                    for m in sample.prompt]
        head, mark, tail = self.user.partition("<image>")
        head, tail = ("", head) if not mark else (head, tail)
        user = head + IMAGE_PLACEHOLDER * len(sample.images) + tail
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": user.replace("{question}", sample.question)}]


@dataclass
class Settings:
    """How a rollout runs: the paper's RL limits; a misspelled setting is a TypeError."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_turns: int = 9                  # model turns per trajectory
    max_turn_tokens: int = 8192         # new tokens per model turn
    max_response_tokens: int = 16384    # everything after the prompt, observations included
    max_prompt_tokens: int = 8192
    max_images: int = 50                # per trajectory, inputs included
    max_pixels: int = None              # image pixel cap (None: model.RL_MAX_PIXELS)
    prompt: Prompt = None               # None: the original's agent prompt set
    tools_on: bool = True               # False: every tool call is refused (eval --no-tools)
    search_url: str = None              # None: $DEEPEYES_SEARCH_URL or the local server
    image_search_cache: object = None   # a tools.ImageSearchCache, as the original
    sandbox_timeout: int = 20           # seconds per code call
    sandbox_sees: str = "original"      # image_i: "original" (RL) or "model" (eval: as it sees)
    on_infra_error: str = "observe"     # "observe": an error observation and go on; "end"
    keep_images: bool = False           # keep tool-output images (eval writes them out)
    read: object = None                 # eval: how a turn is read (None: tools.parse_action, RL's)
    observe: object = None              # eval: (text, images) -> (text, images, what follows)


# ----------------------------------------------------------------------------------------- the loop
@torch.no_grad()
def rollout(model, processor, samples, n=1, script=None, on_done=None, **overrides):
    """Run n trajectories per sample to the end. `script(traj, turn) -> text or ids` forces a
    scripted policy; `on_done(traj)` is called the moment a trajectory ends."""
    cfg = Settings(**overrides)
    tok = processor.tokenizer
    prompt = cfg.prompt = cfg.prompt or load_prompt("agent")
    trajs = []
    # the image is processed once a prompt; each of its n trajectories gets its own lists
    for s in samples:
        one = start(processor, s, prompt, cfg.max_pixels)
        seq = lambda: Seq(*(list(x) for x in (one.seq.ids, one.seq.mm, one.seq.pixels,
                                              one.seq.grids)))
        trajs += [one] + [Trajectory(s, seq(), one.prompt_len, list(one.action_mask),
                                     list(one.logprobs)) for _ in range(n - 1)]
    boxes = {}

    def sandbox_of(t):   # one sandbox per trajectory, started on its first code call
        if id(t) not in boxes:
            images = t.sample.images
            if cfg.sandbox_sees == "model":   # eval, as the original: the image the model sees
                images = [prepare_image(im, max_pixels=cfg.max_pixels or RL_MAX_PIXELS)
                          for im in images]
            boxes[id(t)] = tools.Sandbox(images, timeout=cfg.sandbox_timeout)
        return boxes[id(t)]

    for t in trajs:
        t.finish = "prompt_too_long" if t.prompt_len > cfg.max_prompt_tokens else ""
    ended = set()

    def report_ended():   # each trajectory ended since the last call: decoded, to on_done
        for t in trajs:
            if t.finish and id(t) not in ended:
                ended.add(id(t))
                t.cache, t.forced = None, []
                t.response = tok.decode(t.seq.ids[t.prompt_len:])
                if on_done is not None:
                    on_done(t)

    # the decode batch; a GPU runs the same step as one CUDA graph (support/fast_decode.py)
    kv = (StaticKV if next(model.parameters()).is_cuda else PlainKV)(model)
    pool = ThreadPoolExecutor(max_workers=min(32, max(1, len(trajs))))
    try:
        report_ended()
        while active := [t for t in trajs if not t.finish]:
            for t in active:
                t.turn_ids = []
                if script is not None:   # a scripted turn: text, or token ids (a forced split)
                    turn = script(t, t.turns)
                    t.forced = list(turn) if isinstance(turn, list) else \
                        tok.encode(turn, add_special_tokens=False)
            first = prefill(model, active)
            decode_turns(kv, tok, active, first, cfg)
            jobs = {}
            for t in active:
                t.turns += 1
                text = tok.decode(t.turn_ids)
                action = (cfg.read or tools.parse_action)(text, prompt.tools)   # as offered
                if len(t.turn_ids) >= cfg.max_turn_tokens and action.kind != "answer":
                    t.finish = "turn_tokens"
                elif len(t.seq.ids) - t.prompt_len >= cfg.max_response_tokens:
                    t.finish = "budget"
                elif action.kind in ("answer", "none"):
                    t.finish = "answer" if action.kind == "answer" else "no_action"
                elif t.turns >= cfg.max_turns:
                    t.finish = "max_turns"
                else:
                    jobs[id(t)] = pool.submit(run_tool, t, action, lambda t=t: sandbox_of(t), cfg)
            for t in active:
                if id(t) not in jobs:
                    continue
                text, images = jobs[id(t)].result()
                if t.infra_errors and cfg.on_infra_error == "end":
                    t.finish = "infra_error"
                if not t.finish:   # (an image search the released cache cannot answer ends it)
                    append_observation(processor, t, text, images, cfg)
            report_ended()
    finally:
        pool.shutdown()
        for box in boxes.values():
            box.close()
    return trajs


# -------------------------------------------------------------------------- one round, step by step
def prefill(model, trajs, max_batch_tokens=16384, share=True):
    """Prefill the tokens not yet in each trajectory's cache, several a forward; -> last logits.
    A batch row is [pad | its cache | pad | its new tokens]: every row's last token is last, the
    pads masked out and stripped from the cache kept. With `share`, a prompt's samples share its
    prefill: one runs, the others take its cache (no one writes a cache in place) and logits."""
    dev = next(model.parameters()).device
    pad = model.config.text_config.pad_token_id or 0
    logits = [None] * len(trajs)
    leader, follows = {}, {}
    for i, t in enumerate(trajs):
        if share and t.cached == 0:
            j = leader.setdefault(id(t.sample), i)
            if j != i and trajs[j].seq.ids == t.seq.ids:
                follows[i] = j
    pending = lambda i: len(trajs[i].seq.ids) - trajs[i].cached
    order = sorted((i for i in range(len(trajs)) if i not in follows), key=pending)
    while order:
        group = [order.pop(0)]
        while order and (len(group) + 1) * pending(order[0]) <= max_batch_tokens:
            group.append(order.pop(0))
        ts = [trajs[i] for i in group]
        P = max(len(t.seq.ids) - t.cached for t in ts)
        cache, mask = stack_caches([t.cache for t in ts]) if ts[0].cache else \
            (DynamicCache(), torch.zeros(len(ts), 0, dtype=torch.long))
        ids = torch.full((len(ts), P), pad, dtype=torch.long)
        pos = torch.zeros(3, len(ts), P, dtype=torch.long)
        new = torch.zeros(len(ts), P, dtype=torch.long)
        for b, t in enumerate(ts):
            n = len(t.seq.ids) - t.cached
            ids[b, P - n:] = torch.tensor(t.seq.ids[t.cached:])
            pos[:, b, P - n:] = rope_positions(model, t.seq)[:, t.cached:]
            new[b, P - n:] = 1
        kw = {}
        # images whose pads are in the new tokens
        if any(len(t.seq.pixels) > t.cached_images for t in ts):
            pixels = [p for t in ts for p in t.seq.pixels[t.cached_images:]]
            kw["pixel_values"] = torch.cat(pixels).to(dev, model.dtype)
            grids = [g for t in ts for g in t.seq.grids[t.cached_images:]]
            kw["image_grid_thw"] = torch.tensor(grids, device=dev)
        mask = torch.cat([mask.to(dev), new.to(dev)], 1)
        out = forward_cached(model, ids.to(dev), pos.to(dev), mask, cache, logits_to_keep=1, **kw)
        L = mask.shape[1] - P
        for b, (i, t) in enumerate(zip(group, ts)):
            # its old cache and its new tokens: two slices, no host sync
            c, n = t.cached, len(t.seq.ids) - t.cached
            part = lambda x: torch.cat([x[b:b + 1, :, L - c:L], x[b:b + 1, :, L + P - n:]], 2)
            t.cache = [(part(layer.keys), part(layer.values)) for layer in cache.layers]
            t.cached, t.cached_images = len(t.seq.ids), len(t.seq.pixels)
            t.next_pos = pos[:, b, -1].max().item() + 1
            logits[i] = out.logits[b, -1]
    for i, j in follows.items():
        t, src = trajs[i], trajs[j]
        t.cache, t.cached, t.cached_images, t.next_pos = src.cache, src.cached, src.cached_images, \
            src.next_pos
        logits[i] = logits[j]
    return torch.stack(logits)


def decode_turns(kv, tok, trajs, first_logits, cfg):
    """Decode one turn for every trajectory in one batch; a row leaves when its turn ends."""
    dev = first_logits.device
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # ids past the tokenizer (the 7B's 152,064 output rows, 151,665 tokens): never sampled
    banned = torch.tensor([tok.convert_tokens_to_ids(t) for t in BANNED] +
                          list(range(len(tok), first_logits.shape[-1])), device=dev)
    closes = closing_tokens(tok)
    kv.load(trajs)
    rows = list(range(len(trajs)))                  # row r of the batch is trajs[rows[r]]
    logits = first_logits
    while rows:
        forced = [trajs[i].forced.pop(0) if trajs[i].forced else -1 for i in rows]
        token, logp = sample_token(logits, cfg.temperature, cfg.top_p, banned,
                                   torch.tensor(forced, device=dev) if max(forced) >= 0 else None)
        token, logp = token.tolist(), logp.tolist()      # the one host sync per step
        keep = []
        for r, i in enumerate(rows):
            t = trajs[i]
            t.seq.ids.append(token[r]); t.seq.mm.append(0)
            t.action_mask.append(1); t.logprobs.append(logp[r]); t.turn_ids.append(token[r])
            tail = tok.decode(t.turn_ids[-STOP_WINDOW:]) if token[r] in closes else ""
            stop = any(s in tail for s in cfg.prompt.stops)
            over = len(t.seq.ids) - t.prompt_len >= cfg.max_response_tokens
            if token[r] == eos or stop or over or len(t.turn_ids) >= cfg.max_turn_tokens:
                t.cache = kv.row_cache(r, t.cached)   # its last token is not in it yet
            else:
                keep.append(r)
        if len(keep) < len(rows):
            kv.keep(keep)
            token = [token[r] for r in keep]
            rows = [rows[r] for r in keep]
        if not rows:
            break
        logits = kv.step(torch.tensor(token, device=dev))
        for i in rows:
            trajs[i].cached += 1


class PlainKV:
    """The decode batch: each row's cache left-padded to the longest (masked), one DynamicCache; a
    step is the model's own forward on one token a row. Rows that end leave the batch."""

    def __init__(self, model):
        self.model = model

    def load(self, trajs):
        self.cache, self.mask = stack_caches([t.cache for t in trajs])
        self.pos = torch.tensor([t.next_pos for t in trajs], device=self.mask.device)

    def step(self, token):
        self.mask = F.pad(self.mask, (0, 1), value=1)
        # decoding text, M-RoPE's three positions are the same
        pos = self.pos.view(1, -1, 1).expand(3, -1, 1)
        out = forward_cached(self.model, token[:, None], pos, self.mask, self.cache)
        self.pos = self.pos + 1
        return out.logits[:, -1]

    def keep(self, rows):
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask, self.pos = self.mask[idx], self.pos[idx]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]

    def row_cache(self, r, n):   # a row's n cached tokens are the last n: it is left-padded
        return [(x.keys[r:r + 1, :, -n:], x.values[r:r + 1, :, -n:]) for x in self.cache.layers]


def sample_token(logits, temperature, top_p, banned, forced=None):
    """-> (tokens, their log-probs). temperature 0 is greedy; `forced` (-1 = sample) overrides rows
    for a scripted policy. The log-prob is the model's own (before the ban and top-p): what the
    trainer's forward recomputes (the parity test pins it)."""
    logp = F.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    allowed = logp.clone()
    allowed[:, banned] = float("-inf")
    if temperature == 0:
        tok = allowed.argmax(-1)
    else:
        probs = allowed.softmax(-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0))
        tok = torch.multinomial(probs, 1).squeeze(-1)
    if forced is not None:
        tok = torch.where(forced >= 0, forced, tok)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def run_tool(traj, action, sandbox, cfg):
    """-> (observation text, images). Tool errors are observations; backend failures counted."""
    traj.calls[action.kind] += 1
    if not cfg.tools_on:   # a no-tools run: the call is refused, and the model may still answer
        return TOOLS_OFF, []
    try:
        if action.kind == "code":
            result = sandbox().run(action.arg)
            return tools.format_code_result(result), result["images"]
        if action.kind == "search":
            return tools.text_search(action.arg, url=cfg.search_url)
        if action.kind == "image_search":
            if cfg.image_search_cache:   # keyed by the sample; a miss may end it (the original's)
                found = cfg.image_search_cache(traj.sample.id)
                traj.finish = "" if found else "image_search_miss"
                return found or ("", [])
            if not traj.sample.images:
                return "Error: there is no image to search with.", []
            return tools.image_search(traj.sample.images[0], url=cfg.search_url)
        # a malformed call: the "Error: ..." text itself
        return action.arg, []
    # SandboxError, SearchError, a reply nobody foresaw: the trajectory's, counted, never scored
    except Exception as e:
        traj.infra_errors += 1
        why = f"{type(e).__name__}: {str(e)[:200]}"
        return f"Error: the {action.kind} backend is unavailable ({why}).", []


def append_observation(processor, traj, text, images, cfg):
    """Add the observation's tokens, or end the episode if they would overflow a budget."""
    room = max(cfg.max_images - len(traj.seq.pixels) + len(traj.sample.images), 0)
    if len(images) > room:   # keep the first `room` images and their slots
        kept = text.split(tools.IMAGE_SLOT)
        text = tools.IMAGE_SLOT.join(kept[:room + 1]) + "".join(kept[room + 1:])
        text += f"\n[some images were dropped: at most {cfg.max_images} per trajectory]"
        images = images[:room]
    suffix = OBS_SUFFIX
    if cfg.observe:   # eval: the observation as the authors' VLMEvalKit fork sent it
        text, images, suffix = cfg.observe(text, images)
    obs = observation_tokens(processor, text, images, cfg.max_pixels, suffix)
    if len(traj.seq.ids) + len(obs.ids) - traj.prompt_len > cfg.max_response_tokens:
        traj.finish = "budget"
        return
    traj.seq.extend(obs)
    if cfg.keep_images:   # eval writes them out; RL does not keep them (memory)
        traj.obs_images += images
    traj.action_mask += [0] * len(obs.ids)
    traj.logprobs += [0.0] * len(obs.ids)


def observation_tokens(processor, text, images, max_pixels=None, suffix=OBS_SUFFIX):
    """OBS_PREFIX + text + suffix as tokens. The text is tool output, untrusted: encoded as plain
    text (a page's "<|im_end|><|im_start|>system" stays text), the only images the real ones, one
    at each IMAGE_SLOT; else the same ids as the whole string's (the parity tests pin it)."""
    kw = {"max_pixels": max_pixels} if max_pixels else {}
    # a lone surrogate (chr(0xd800)) becomes "?"
    text = text.encode("utf-8", "replace").decode("utf-8")
    seq = encode(processor, OBS_PREFIX)
    pieces = text.split(tools.IMAGE_SLOT)
    for k, piece in enumerate(pieces):
        ids = encode_plain(processor.tokenizer, piece)
        seq.extend(Seq(ids, [0] * len(ids)))
        if k < len(images):
            seq.extend(encode(processor, IMAGE_PLACEHOLDER, images[k:k + 1], **kw))
    seq.extend(encode(processor, suffix))
    return seq


# ------------------------------------------------------------------------------------------ prompts
def load_prompt(name_or_path="agent"):
    """The original's prompt set `agent`, `code` or `direct` (data/prompts/, byte for byte), or a
    system prompt file of your own: its user template is the file beside it named with user_prompt
    for system_prompt, if any."""
    system = os.path.join(PROMPTS, f"{name_or_path}_system_prompt.txt") \
        if name_or_path in PROMPT_SETS else name_or_path
    user = system.replace("system_prompt", "user_prompt") \
        if "system_prompt" in os.path.basename(system) else None
    read = lambda path: open(path, encoding="utf-8").read()
    if not os.path.exists(system):
        raise FileNotFoundError(f"prompt {name_or_path!r}: neither one of {', '.join(PROMPT_SETS)} "
                                "nor a file")
    return Prompt(read(system), read(user) if user and os.path.exists(user) else "{question}",
                  ("code",) if name_or_path == "code" else Prompt.tools)


def start(processor, sample, prompt, max_pixels=None):
    text = processor.apply_chat_template(prompt.messages(sample), tokenize=False,
                                         add_generation_prompt=True)
    kw = {"max_pixels": max_pixels} if max_pixels else {}
    seq = encode(processor, text, sample.images, **kw)
    return Trajectory(sample, seq, len(seq.ids), [0] * len(seq.ids), [0.0] * len(seq.ids))
