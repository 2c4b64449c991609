"""rollout.py -- the agent loop: a model becomes an agent that thinks, calls tools, reads their output, and answers.

One loop serves RL (grpo.py, sampled) and evaluation (eval.py, greedy). A round is: every active trajectory prefills
its pending tokens into its own KV cache, then all of them decode together in one batch until each has ended its turn
(`</code>`, `</tool_call>` or `<|im_end|>`), then all their tools run concurrently, and the observations are appended
in SPEC section 1's exact token format. The token stream of a trajectory is exactly the chat template applied to the
final conversation (test_all.py checks it), so SFT data and rollouts share one format.

Deliberate choices:
- Plain PyTorch over the model's forward; M-RoPE positions computed here and passed explicitly.
- Each trajectory keeps its own KV cache across turns (an observation costs only its own prefill); the batch stacks
  the caches left-padded for decoding and splits them back when a turn ends. `--no-cache` re-prefills instead
  (the bench measures both; the cache is faster and is the default).
- Rounds are synchronous: a trajectory whose turn ended early waits for the round's longest turn, and its tool
  runs concurrently with everyone else's. Simpler than continuous batching, at some decode efficiency.
- The policy may never emit `<|endoftext|>`, `<|im_start|>` or vision tokens (banned at sampling, as the original).
- A tool backend failure (sandbox or search down) is an observation that lets the model go on, and is counted in
  `Trajectory.infra_errors` so that no one scores it as a wrong answer (`on_infra_error="end"` ends the episode,
  as the original did).

Commands:
  python rollout.py --bench                  # tok/s: batched rollout vs model.generate one at a time; cache vs not
  python rollout.py --bench --preset 7b      # the same on the real 7B architecture (random weights, GPU)
"""
import argparse
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import tools
from model import IMAGE_PLACEHOLDER, Seq, encode, rope_positions

SYSTEM_PROMPT = """You are a capable visual agent. Keep working until the question is fully solved.
Reason step by step inside <think> </think> before every action and reflect on every result you get.
You may act in one of these ways per turn, and only one:
1. Run Python in a notebook: <code>
```python
...
```
</code>. Variables persist between calls. The i-th input image is preloaded as the PIL image `image_i`
(image_1, image_2, ...). Images shown with plt.show() or display(img) come back to you. Do not write files and
do not write infinite loops.
2. Search the web by text: <tool_call>{"name": "search", "arguments": {"query": "..."}}</tool_call>
3. Search the web by the original image (at most once): <tool_call>{"name": "image_search"}</tool_call>
Plan before each call and check its result after. When you are sure, give the final answer inside <answer> </answer>."""
USER_SUFFIX = ("\nThink inside <think> </think>, act with <code> </code> or <tool_call> </tool_call> when needed, "
               "and put the final answer inside <answer> </answer>.")
OBS_PREFIX = "<|im_end|>\n<|im_start|>user\n"              # closes the model's turn, opens a user turn
OBS_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>"   # ... and pre-fills the next turn's <think>
STOP_STRINGS = ("</code>", "</tool_call>")
BANNED = ("<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
          "<|video_pad|>")


@dataclass
class Sample:
    images: list            # PIL images, image_1 .. image_n
    question: str
    answer: str = ""
    data_source: str = "reason"   # perception | reason | search (SPEC 6), decides the search cost in the reward
    id: str = ""


@dataclass
class Trajectory:
    sample: Sample
    seq: Seq                 # every token (prompt, model turns, observations) and every image, in order
    prompt_len: int
    action_mask: list        # 1 exactly on model-sampled tokens
    logprobs: list           # the sampler's log-prob of each sampled token (0 elsewhere)
    turns: int = 0
    calls: Counter = field(default_factory=Counter)   # code / search / image_search / error
    finish: str = ""         # answer | no_action | max_turns | turn_tokens | budget | prompt_too_long | infra_error
    infra_errors: int = 0
    response: str = ""       # decoded response (tool outputs included), what the reward reads
    reward: dict = field(default_factory=dict)
    # rollout-internal state
    cache: list = None       # per layer (k, v) of shape [1, H, T, D], covering seq.ids[:cached]
    cached: int = 0
    cached_images: int = 0
    turn_ids: list = field(default_factory=list)
    forced: list = field(default_factory=list)

    @property
    def answer(self):
        action = tools.parse_action(self.response)
        return action.arg if action.kind == "answer" else None


def load_system_prompt(path=None):
    """The system prompt, or the contents of `path` (users override the wording without touching code)."""
    if path is None:
        return SYSTEM_PROMPT
    with open(path, encoding="utf-8") as f:
        return f.read()


def prompt_messages(sample, system_prompt=SYSTEM_PROMPT):
    user = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.question + USER_SUFFIX}]
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


def start(processor, sample, system_prompt=SYSTEM_PROMPT, max_pixels=None):
    text = processor.apply_chat_template(prompt_messages(sample, system_prompt), tokenize=False,
                                         add_generation_prompt=True)
    kw = {"max_pixels": max_pixels} if max_pixels else {}
    seq = encode(processor, text, sample.images, **kw)
    return Trajectory(sample, seq, len(seq.ids), [0] * len(seq.ids), [0.0] * len(seq.ids))


# ------------------------------------------------------------------------------------------- one forward
def forward_pending(model, traj):
    """Prefill the tokens not yet in this trajectory's cache (batch of one, exact); return the last logits."""
    dev = next(model.parameters()).device
    new = slice(traj.cached, len(traj.seq.ids))
    pos = rope_positions(model, traj.seq, dev)[:, new].unsqueeze(1)
    ids = torch.tensor([traj.seq.ids[new]], device=dev)
    kw = {}
    if len(traj.seq.pixels) > traj.cached_images:   # images whose pads are in the new tokens
        kw["pixel_values"] = torch.cat(traj.seq.pixels[traj.cached_images:]).to(dev, model.dtype)
        kw["image_grid_thw"] = torch.tensor(traj.seq.grids[traj.cached_images:], device=dev)
    cache = DynamicCache(ddp_cache_data=traj.cache) if traj.cache else DynamicCache()
    out = model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True,
                attention_mask=torch.ones(1, len(traj.seq.ids), dtype=torch.long, device=dev), **kw)
    traj.cache = [(k, v) for k, v, _ in cache]
    traj.cached, traj.cached_images = len(traj.seq.ids), len(traj.seq.pixels)
    return out.logits[0, -1]


def stack_caches(trajs):
    """Left-pad every trajectory's cache to the longest and stack: [B, H, L, D] per layer, plus the pad mask."""
    L = max(t.cached for t in trajs)
    layers = []
    for layer in range(len(trajs[0].cache)):
        ks, vs = [], []
        for t in trajs:
            k, v = t.cache[layer]
            pad = L - k.shape[2]
            ks.append(F.pad(k, (0, 0, pad, 0)))
            vs.append(F.pad(v, (0, 0, pad, 0)))
        layers.append((torch.cat(ks), torch.cat(vs)))
    mask = torch.tensor([[0] * (L - t.cached) + [1] * t.cached for t in trajs], device=layers[0][0].device)
    return DynamicCache(ddp_cache_data=layers), mask


def sample_token(logits, temperature, top_p, banned):
    """-> (token, its log-prob). temperature 0 is greedy. The log-prob is the model's own (before the ban and top-p),
    which is exactly what the trainer's forward recomputes: the parity test pins it."""
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
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


# ------------------------------------------------------------------------------------------- one round
def decode_turns(model, tok, trajs, first_logits, cfg):
    """Decode one turn for every trajectory in one batch; rows leave the batch when their turn ends."""
    dev = first_logits.device
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    banned = [tok.convert_tokens_to_ids(t) for t in BANNED]
    cache, mask = stack_caches(trajs)
    rows = list(range(len(trajs)))                  # row r of the batch is trajs[rows[r]]
    pos = torch.tensor([rope_positions(model, t.seq)[:, -1].max().item() + 1 for t in trajs], device=dev)
    logits = first_logits
    while rows:
        token, logp = sample_token(logits, cfg["temperature"], cfg["top_p"], banned)
        token, logp = token.tolist(), logp.tolist()
        keep = []
        for r, i in enumerate(rows):
            t = trajs[i]
            if t.forced:                             # a scripted policy: its token, the model's log-prob of it
                token[r] = t.forced.pop(0)
                logp[r] = F.log_softmax(logits[r].float() / max(cfg["temperature"], 1e-6), -1)[token[r]].item()
            t.seq.ids.append(token[r]); t.seq.mm.append(0)
            t.action_mask.append(1); t.logprobs.append(logp[r]); t.turn_ids.append(token[r])
            tail = tok.decode(t.turn_ids[-8:])
            over = len(t.seq.ids) - t.prompt_len >= cfg["max_response_tokens"]
            if token[r] == eos or any(s in tail for s in STOP_STRINGS) or over or \
                    len(t.turn_ids) >= cfg["max_turn_tokens"]:
                k, v = zip(*[(kk[r:r + 1, :, -t.cached:], vv[r:r + 1, :, -t.cached:]) for kk, vv, _ in cache])
                t.cache = list(zip(k, v))            # this row's cache, padding stripped (its last token is pending)
            else:
                keep.append(r)
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=dev, dtype=torch.long)
            cache.batch_select_indices(idx)
            mask, pos = mask[idx], pos[idx]
            token = [token[r] for r in keep]
            rows = [rows[r] for r in keep]
        if not rows:
            break
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=dev)], 1)
        out = model(input_ids=torch.tensor(token, device=dev)[:, None], attention_mask=mask, cache=cache,
                    position_ids=pos.view(1, -1, 1).expand(3, -1, -1), use_cache=True)
        for r, i in enumerate(rows):
            trajs[i].cached += 1
        pos = pos + 1
        logits = out.logits[:, -1]


def run_tool(traj, action, sandbox, cfg):
    """-> (observation text, images). Tool errors are observations; backend failures are counted too."""
    traj.calls[action.kind] += 1
    try:
        if action.kind == "code":
            result = sandbox().run(action.arg)
            return tools.format_code_result(result), result["images"]
        if action.kind == "search":
            return tools.text_search(action.arg, url=cfg["search_url"])
        if action.kind == "image_search":
            if not traj.sample.images:
                return "Error: there is no image to search with.", []
            return tools.image_search(traj.sample.images[0], url=cfg["search_url"])
        return action.arg, []                        # a malformed call: the "Error: ..." text itself
    except (tools.SandboxError, tools.SearchError) as e:
        traj.infra_errors += 1
        return f"Error: the {action.kind} backend is unavailable ({str(e)[:200]}).", []


def append_observation(processor, traj, text, images, cfg):
    """Add the observation tokens, or end the episode if they would overflow a budget (never end on them)."""
    room = cfg["max_images"] - len(traj.seq.pixels) + len(traj.sample.images)
    if len(images) > room:
        images = images[:max(room, 0)]
        text = text.replace(IMAGE_PLACEHOLDER, "", text.count(IMAGE_PLACEHOLDER) - len(images))
        text += f"\n[some images were dropped: at most {cfg['max_images']} per trajectory]"
    obs = encode(processor, OBS_PREFIX + text + OBS_SUFFIX, images)
    if len(traj.seq.ids) + len(obs.ids) - traj.prompt_len > cfg["max_response_tokens"]:
        traj.finish = "budget"
        return
    traj.seq.extend(obs)
    traj.action_mask += [0] * len(obs.ids)
    traj.logprobs += [0.0] * len(obs.ids)


DEFAULTS = dict(temperature=1.0, top_p=1.0, max_turns=9, max_turn_tokens=8192, max_response_tokens=16384,
                max_prompt_tokens=8192, max_images=50, use_cache=True, tools_on=True, search_url=None,
                on_infra_error="observe", sandbox_timeout=20, system_prompt=SYSTEM_PROMPT, max_pixels=None)


@torch.no_grad()
def rollout(model, processor, samples, n=1, script=None, **overrides):
    """Run n trajectories per sample to the end. `script(traj, turn) -> text` forces a scripted policy's turns."""
    cfg = dict(DEFAULTS, **overrides)
    tok = processor.tokenizer
    trajs = [start(processor, s, cfg["system_prompt"], cfg["max_pixels"]) for s in samples for _ in range(n)]
    boxes = {}

    def sandbox_of(t):   # one sandbox per trajectory, started on its first code call
        if id(t) not in boxes:
            boxes[id(t)] = tools.Sandbox(t.sample.images, timeout=cfg["sandbox_timeout"])
        return boxes[id(t)]

    for t in trajs:
        if t.prompt_len > cfg["max_prompt_tokens"]:
            t.finish = "prompt_too_long"
    pool = ThreadPoolExecutor(max_workers=min(32, max(1, len(trajs))))
    try:
        while active := [t for t in trajs if not t.finish]:
            for t in active:
                t.turn_ids = []
                if script is not None:
                    t.forced = tok.encode(script(t, t.turns), add_special_tokens=False)
                if not cfg["use_cache"]:
                    t.cache, t.cached, t.cached_images = None, 0, 0
            first = torch.stack([forward_pending(model, t) for t in active])
            decode_turns(model, tok, active, first, cfg)
            jobs = {}
            for t in active:
                t.turns += 1
                text = tok.decode(t.turn_ids)
                action = tools.parse_action(text)
                if len(t.turn_ids) >= cfg["max_turn_tokens"] and action.kind != "answer":
                    t.finish = "turn_tokens"
                elif len(t.seq.ids) - t.prompt_len >= cfg["max_response_tokens"]:
                    t.finish = "budget"
                elif action.kind in ("answer", "none"):
                    t.finish = "answer" if action.kind == "answer" else "no_action"
                elif t.turns >= cfg["max_turns"]:
                    t.finish = "max_turns"
                elif not cfg["tools_on"]:
                    t.finish = "no_action"
                else:
                    jobs[id(t)] = pool.submit(run_tool, t, action, lambda t=t: sandbox_of(t), cfg)
            for t in active:
                if id(t) in jobs:
                    text, images = jobs[id(t)].result()
                    if t.infra_errors and cfg["on_infra_error"] == "end":
                        t.finish = "infra_error"
                    else:
                        append_observation(processor, t, text, images, cfg)
    finally:
        pool.shutdown()
        for box in boxes.values():
            box.close()
    for t in trajs:
        t.cache, t.forced = None, []
        t.response = tok.decode(t.seq.ids[t.prompt_len:])
    return trajs
