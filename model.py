"""model.py -- the bottom floor: load Qwen2.5-VL, prepare images, encode, score tokens.

Everything above this file (rollout, sft, grpo, eval) talks to the model only through:
  load_model(name_or_path)       -> (model, processor)  the 7B (hub or folder), or a tiny one
  prepare_image(img, ...)        -> PIL.Image   the image rules (aspect, min side, smart resize)
  encode(processor, text, imgs)  -> Seq         token ids + image tensors, placeholders expanded
  token_logprobs(model, seqs)    -> [B, T]      log p(token_t | tokens_<t), explicit positions

Deliberate choices (each measured on transformers 5.x):
- No torchvision: the processor is a Qwen2_5_VLProcessor subclass without the video processor.
- Positions are always computed here with get_rope_index and passed explicitly; the model's cached
  `rope_deltas` are never relied on (they silently corrupt positions when trajectories are
  interleaved).
- Trajectories are kept as token ids end to end; text is never re-tokenised.

A tiny Qwen2.5-VL for CPUs (the tests, the miniature): `python -m support.tiny DIR`
(support/tiny.py).
"""
import functools
import inspect
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
try:   # transformers >= 5.2x: the PIL image processor (no torchvision needed)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
except ImportError:   # older 5.x (the GPU machines' 5.17)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import \
        Qwen2VLImageProcessor as Qwen2VLImageProcessorPil

from support.fast_decode import growing_cache

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
RL_MAX_PIXELS = 16384 * 28 * 28   # RL / eval (data/PROTOCOL.md, Images)
SFT_MAX_PIXELS = 512 * 512        # cold-start SFT
MIN_PIXELS = 56 * 56
FACTOR = 28                       # patch 14 x merge 2: one LLM token per 28x28 pixels
# Qwen2.5's added tokens after its 151,643 byte-level BPE ranks (ids 151643..151664, as the hub's
# tokenizer_config); <tool_call> and </tool_call> are added but not special. Every other protocol
# tag (<think>, <code>, ...) is plain text.
QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
              "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
              "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
              "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
              "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
# ------------------------------------------------------------------------------------------ loading
def load_model(name_or_path=DEFAULT_MODEL, device=None, dtype=None):
    """(model, processor) from a hub name or a local folder; bf16 + sdpa on CUDA, float32 on CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    folder = os.path.isdir(name_or_path)
    if folder and not os.path.exists(os.path.join(name_or_path, "config.json")):
        sys.exit(f"error: {os.path.abspath(name_or_path)} is a folder without config.json: not "
                 "a model (a hub name or a folder written by save_pretrained / `python -m "
                 "support.tiny DIR`)")
    try:
        processor = Processor.from_pretrained(name_or_path)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype,
                                                                   attn_implementation="sdpa")
    except OSError as e:
        where = os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path
        sys.exit(f"error: cannot load model '{where}' ({str(e).splitlines()[0][:160]}). Download "
                 f"it on a machine with hub access (`hf download {name_or_path} --local-dir DIR`), "
                 "copy DIR here and pass --model DIR; or build the CPU model with `python -m "
                 "support.tiny DIR`.")
    model.config.use_cache = True
    return model.to(device).eval(), processor


class Processor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video processor, which needs torchvision: `AutoProcessor`
    fails without it, and the PyPI torchvision does not import beside the CPU torch wheel."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # the processor's sub-processors are read off this signature: no video_processor here means
        # none is needed
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from transformers import AutoTokenizer
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        return cls(image_processor, tokenizer,
                   chat_template=getattr(tokenizer, "chat_template", None))


# ------------------------------------------------------------------------------------------- tokens
@dataclass
class Seq:
    """One token sequence with its images: what a forward pass needs, and nothing model-specific
    beyond that."""
    ids: list                                      # token ids
    # 1 on <|image_pad|> tokens, else 0 (mm_token_type_ids)
    mm: list
    pixels: list = field(default_factory=list)     # per image: [patches, C*T*P*P] float tensor
    grids: list = field(default_factory=list)      # per image: (t, h, w) in patches

    def extend(self, other):
        self.ids += other.ids; self.mm += other.mm
        self.pixels += other.pixels; self.grids += other.grids


# the text of Qwen's special tokens: <|im_end|>, <|image_pad|>, ...
SPECIAL_TEXT = re.compile(r"<\|[a-z_]+\|>")


def refuse_special_text(text, what="question"):
    """ValueError (the loaders report the row and skip it) if a dataset's text holds a special
    token's text: encode() would read "<|image_pad|>" as an image slot with no image (a crash
    mid-run; HF's processor fails on it too) and "<|im_end|>" as the end of the turn (the rollout
    writes tool outputs as plain text: SFT would train on another token stream)."""
    found = SPECIAL_TEXT.search(text)
    if found:
        raise ValueError(f"{what} holds the special-token text {found.group()!r}")
    # a lone surrogate ("\ud800" in the JSON) cannot be tokenized: UnicodeEncodeError here
    text.encode("utf-8")


def encode(processor, text, images=(), max_pixels=RL_MAX_PIXELS):
    """Tokenise `text`, expanding each IMAGE_PLACEHOLDER to one <|image_pad|> per merged 28x28 patch
    of its image.

    Splitting at special tokens first keeps the result identical to `processor(text=...,
    images=...)`, because the byte-level BPE never merges across special tokens anyway."""
    tok = processor.tokenizer
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    pixels, grids = [], []
    if images:
        prepared = [prepare_image(im, max_pixels=max_pixels) for im in images]
        size = {"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels}
        out = processor.image_processor(images=prepared, size=size, return_tensors="pt")
        grids = [tuple(g) for g in out["image_grid_thw"].tolist()]
        pixels = list(torch.split(out["pixel_values"], [t * h * w for t, h, w in grids]))
    n_pads = [t * h * w // 4 for t, h, w in grids]   # merge 2x2
    if text.count("<|image_pad|>") != len(images):
        raise ValueError(f"{text.count('<|image_pad|>')} image placeholders but {len(images)} "
                         "images")
    ids = []
    for i, chunk in enumerate(text.split("<|image_pad|>")):
        ids += tok.encode(chunk, add_special_tokens=False) if chunk else []
        if i < len(n_pads):
            ids += [pad_id] * n_pads[i]
    return Seq(ids, [int(t == pad_id) for t in ids], pixels, grids)


def token_logprobs(model, seqs, temperature=1.0, with_entropy=False, chunk=2048, _gathered=False):
    """Per-token log-probs [B, T-1] of seqs[b].ids[1:] under the model (one forward, right padded).

    Entry t scores token t+1. Padding positions hold 0. This is the training forward of SFT and
    GRPO, and the rollout's sampler log-probs must match it
    (test_all.py::test_rollout_logprobs_match_training_forward). The vocabulary projection runs
    `chunk` positions at a time under checkpointing: full float32 logits of a 16k-token 7B
    trajectory would be 16384 x 152064 x 4 bytes = 10 GB, twice over with the log-softmax."""
    # sharded (torchrun): run as the root's forward, so that FSDP gathers the weights it reads
    if not _gathered and hasattr(model, "fsdp_logprobs"):
        return model.fsdp_logprobs(seqs, temperature, with_entropy, chunk)
    device = next(model.parameters()).device
    batch = collate(model, seqs, device)
    hidden = model.model(**batch, use_cache=False).last_hidden_state[:, :-1]
    targets = batch["input_ids"][:, 1:]

    # one chunk: logits -> log-softmax -> log-prob of the target (and the entropy)
    def score(h, tgt):
        logp_all = F.log_softmax(model.lm_head(h).float() / temperature, dim=-1)
        logp = logp_all.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        if not with_entropy:
            return logp, logp
        # a metric only: with a graph, its recomputed [chunk, vocab] tensors would stay alive to
        # the end of backward (+1.2 GB per 1k tokens)
        with torch.no_grad():
            return logp, -(logp_all.exp() * logp_all).sum(-1)

    spans = [(hidden[:, s:s + chunk], targets[:, s:s + chunk])
             for s in range(0, targets.shape[1], chunk)]
    parts = [torch.utils.checkpoint.checkpoint(score, h, t, use_reentrant=False)
             if torch.is_grad_enabled() else score(h, t) for h, t in spans]
    live = batch["attention_mask"][:, 1:]
    logp = torch.cat([p[0] for p in parts], 1) * live
    return (logp, torch.cat([p[1] for p in parts], 1) * live) if with_entropy else logp


def rope_positions(model, seq, device=None):
    """[3, T] M-RoPE position ids of one sequence (text tokens advance by one, image tokens by their
    grid)."""
    ids = torch.tensor([seq.ids], device=device)
    mm = torch.tensor([seq.mm], device=device)
    grid = torch.tensor(seq.grids, device=device) if seq.grids else None
    if grid is None:   # text only: every axis is the plain index
        return torch.arange(len(seq.ids), device=device).expand(3, -1)
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid)
    return pos[:, 0]


# transformers 5.x renamed the forward's cache argument (`cache=`, deprecating `past_key_values=`)
FORWARD = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
CACHE_KW = "cache" if "cache" in FORWARD else "past_key_values"


def forward_cached(model, ids, pos, mask, cache, **kw):
    """The forward of new tokens [B, P] at positions [3, B, P] after `cache` (which it extends);
    `mask` [B, cached + P] is 0 on padding."""
    return model(input_ids=ids, position_ids=pos, attention_mask=mask, **{CACHE_KW: cache},
                 use_cache=True, **kw)


def stack_caches(caches):
    """Per-layer (k, v) caches of shape [1, H, T_b, D], left-padded to the longest and stacked:
    -> (one cache for the batch, grown in place as it decodes, its mask [B, T], 0 on padding)."""
    T = [c[0][0].shape[2] for c in caches]
    pad = lambda x, n: F.pad(x, (0, 0, max(T) - n, 0))
    stack = lambda i, kv: torch.cat([pad(c[i][kv], n) for c, n in zip(caches, T)])
    cache = growing_cache([(stack(i, 0), stack(i, 1)) for i in range(len(caches[0]))])
    mask = torch.tensor([[0] * (max(T) - n) + [1] * n for n in T],
                        device=cache.layers[0].keys.device)
    return cache, mask


def collate(model, seqs, device):
    """Right-pad sequences into one batch: ids, attention mask, explicit positions, and all their
    images."""
    T = max(len(s.ids) for s in seqs)
    pad = model.config.text_config.pad_token_id or 0
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    pos = torch.zeros((3, len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s.ids)] = torch.tensor(s.ids)
        attn[b, :len(s.ids)] = 1
        pos[:, b, :len(s.ids)] = rope_positions(model, s)
    batch = dict(input_ids=ids.to(device), attention_mask=attn.to(device),
                 position_ids=pos.to(device))
    pixels = [p for s in seqs for p in s.pixels]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels).to(device)
        batch["image_grid_thw"] = torch.tensor([g for s in seqs for g in s.grids], device=device)
    return batch


def encode_plain(tok, text):
    """Token ids of untrusted text (tool output): the strings of Qwen's special tokens and of
    <tool_call> / </tool_call> are encoded as the plain text they are, never as those tokens;
    everything else as usual (a word the vocabulary has as one added token stays that token)."""
    ids = []
    for k, part in enumerate(guarded_tokens(tok).split(text)):
        if k % 2:   # a special token's string: its plain byte-level BPE pieces
            backend = tok.backend_tokenizer
            ids += [t.id for piece, _ in backend.pre_tokenizer.pre_tokenize_str(part)
                    for t in backend.model.tokenize(piece)]
        elif part:
            ids += tok.encode(part, add_special_tokens=False)
    return ids


@functools.lru_cache(maxsize=8)
def guarded_tokens(tok):
    """A regex that splits text at the strings of the tokenizer's special tokens (and <tool_call> /
    </tool_call>)."""
    strings = sorted((t for t in QWEN_ADDED if t in tok.get_vocab()), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, strings)) + ")")


# ------------------------------------------------------------------------------------------- images
@functools.lru_cache(maxsize=4)
def closing_tokens(tok):
    """Ids of tokens holding ">": only they can end a stop string, so only they make us decode the
    tail (decoding every row's tail every step cost more host time than the 7B's decode step)."""
    names = tok.convert_ids_to_tokens(list(range(len(tok))))
    return frozenset(i for i, t in enumerate(names) if ">" in t)


def load_image(src, check_only=False):
    """An RGB image from a path or bytes, decoded in full (a truncated file fails here, at load, not
    mid-run); check_only: open and verify only (fast), return None. Anything unreadable raises
    ValueError with the reason: a missing or corrupt file, a non-image, a decompression bomb (a
    20000 x 20000 PNG), a path that is not a str."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            if check_only:
                img.verify()
                return None
            return img.convert("RGB")
    except (OSError, ValueError, TypeError, AttributeError, SyntaxError,
            Image.DecompressionBombError) as e:
        what = src if isinstance(src, str) else f"({type(src).__name__})"
        raise ValueError(f"unreadable image {what}: {type(e).__name__}: {str(e)[:120]}") from e


def prepare_image(img, min_pixels=MIN_PIXELS, max_pixels=RL_MAX_PIXELS, resample=Image.BICUBIC):
    """Squeeze aspect ratios > 200, upscale sides < 32 px, then smart-resize to multiples of 28 (as
    the original; BICUBIC, as the processor)."""
    img = img.convert("RGB")
    w, h = img.size
    if not w or not h:
        raise ValueError(f"an empty image ({w}x{h})")
    if max(w, h) / min(w, h) > 200:   # squeeze the long side so the ratio drops below 200
        w, h = (min(w, 199 * h), h) if w > h else (w, min(h, 199 * w))
    if min(w, h) < 32:                # Qwen-VL fails on tiny sides: upscale the short side to 32
        s = 32 / min(w, h)
        w, h = math.ceil(w * s), math.ceil(h * s)
    hb, wb = max(FACTOR, round(h / FACTOR) * FACTOR), max(FACTOR, round(w / FACTOR) * FACTOR)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(FACTOR, math.floor(h / beta / FACTOR) * FACTOR)
        wb = max(FACTOR, math.floor(w / beta / FACTOR) * FACTOR)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / FACTOR) * FACTOR, math.ceil(w * beta / FACTOR) * FACTOR
    # rounding a thin side up to 28 can pass the processor's 200:1
    hb, wb = min(hb, 200 * wb), min(wb, 200 * hb)
    return img if (wb, hb) == img.size else img.resize((wb, hb), resample)


def set_gradient_checkpointing(model):
    """Trade compute for memory in training forwards (the 7B needs it at 16k-token trajectories)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


