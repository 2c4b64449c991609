"""model.py -- the bottom floor: load Qwen2.5-VL, build a tiny one, prepare images, encode, score tokens.

Everything above this file (rollout, sft, grpo, eval) talks to the model only through:
  load_model(name_or_path)       -> (model, processor)   real 7B from the hub / a folder, or the tiny model
  build_tiny(path, preset)       -> path                  a random-weight Qwen2.5-VL in miniature, saved like the hub
  prepare_image(img, ...)        -> PIL.Image             the image rules (aspect, min side, smart resize)
  encode(processor, text, imgs)  -> Seq                   token ids + image tensors, placeholders expanded
  token_logprobs(model, seqs)    -> [B, T] tensor         log p(token_t | tokens_<t) with explicit M-RoPE positions

Deliberate choices (each measured on transformers 5.x):
- No torchvision: the processor is a Qwen2_5_VLProcessor subclass without the video processor.
- Positions are always computed here with get_rope_index and passed explicitly; the model's cached `rope_deltas`
  are never relied on (they silently corrupt positions when trajectories are interleaved).
- Trajectories are kept as token ids end to end; text is never re-tokenised.

Commands:
  python model.py --tiny /tmp/tiny          # build and save a tiny random model, then reload it and score a sample
"""
import argparse
import functools
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from tools import IMAGE_PLACEHOLDER   # the protocol constant lives in tools.py (which needs no torch)
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
try:   # transformers >= 5.2x: the PIL image processor (no torchvision needed)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
except ImportError:   # older 5.x (the GPU machines' 5.17)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
RL_MAX_PIXELS = 16384 * 28 * 28   # RL / eval (data/PROTOCOL.md, Images)
SFT_MAX_PIXELS = 512 * 512        # cold-start SFT
MIN_PIXELS = 56 * 56
FACTOR = 28                       # patch 14 x merge 2: one LLM token per 28x28 pixels
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5's added tokens after its 151,643 byte-level BPE ranks (ids 151643..151664, as the hub's tokenizer_config);
# <tool_call> and </tool_call> are added but not special. Every other protocol tag (<think>, <code>, ...) is plain text.
QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
              "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
              "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+")
# The Qwen2.5-VL chat template, restricted to what the protocol uses (system / user / assistant, text + images).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Two tiny presets: "test" keeps the unit tests fast, "mini" is big enough to learn the miniature world.
TINY_PRESETS = {
    "test": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vis_hidden=32, vis_depth=2, vocab=600),
    "mini": dict(hidden=256, layers=4, heads=4, kv_heads=2, inter=768, vis_hidden=64, vis_depth=2, vocab=1200),
}


# ----------------------------------------------------------------------------------------------------- loading
def load_model(name_or_path=DEFAULT_MODEL, device=None, dtype=None):
    """(model, processor) from a hub name or a local folder; bf16 + sdpa on CUDA, float32 on CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if os.path.isdir(name_or_path) and not os.path.exists(os.path.join(name_or_path, "config.json")):
        sys.exit(f"error: {os.path.abspath(name_or_path)} is a folder without config.json: not a model (a hub name "
                 "or a folder written by save_pretrained / `python model.py --tiny DIR`)")
    try:
        processor = Processor.from_pretrained(name_or_path)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype,
                                                                   attn_implementation="sdpa")
    except OSError as e:
        where = os.path.abspath(name_or_path) if os.path.exists(name_or_path) else name_or_path
        sys.exit(f"error: cannot load model '{where}' ({str(e).splitlines()[0][:160]}). Download it on a machine "
                 f"with hub access (`hf download {name_or_path} --local-dir DIR`), copy DIR here and pass "
                 f"--model DIR; or build the CPU model with `python model.py --tiny DIR`.")
    model.config.use_cache = True
    return model.to(device).eval(), processor


class Processor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video processor, which needs torchvision: `AutoProcessor` fails without
    it, and the PyPI torchvision does not import beside the CPU torch wheel."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # the processor's sub-processors are read off this signature: no video_processor here means none is needed
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        from transformers import AutoTokenizer
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        return cls(image_processor, tokenizer, chat_template=getattr(tokenizer, "chat_template", None))


# ----------------------------------------------------------------------------------------------------- tokens
@dataclass
class Seq:
    """One token sequence with its images: what a forward pass needs, and nothing model-specific beyond that."""
    ids: list                                      # token ids
    mm: list                                       # 1 on <|image_pad|> tokens, else 0 (mm_token_type_ids)
    pixels: list = field(default_factory=list)     # per image: [patches, C*T*P*P] float tensor
    grids: list = field(default_factory=list)      # per image: (t, h, w) in patches

    def extend(self, other):
        self.ids += other.ids; self.mm += other.mm; self.pixels += other.pixels; self.grids += other.grids


SPECIAL_TEXT = re.compile(r"<\|[a-z_]+\|>")   # the text of Qwen's special tokens: <|im_end|>, <|image_pad|>, ...


def refuse_special_text(text, what="question"):
    """ValueError (the loaders report the row and skip it) if a dataset's text holds a special token's text: encode()
    would read "<|image_pad|>" as an image slot with no image (a crash mid-run; HF's processor fails on it too) and
    "<|im_end|>" as the end of the turn (the rollout writes tool outputs as plain text: SFT would train on another
    token stream)."""
    found = SPECIAL_TEXT.search(text)
    if found:
        raise ValueError(f"{what} holds the special-token text {found.group()!r}")
    text.encode("utf-8")   # a lone surrogate ("\ud800" in the JSON) cannot be tokenized: UnicodeEncodeError here


def encode(processor, text, images=(), max_pixels=RL_MAX_PIXELS):
    """Tokenise `text`, expanding each IMAGE_PLACEHOLDER to one <|image_pad|> per merged 28x28 patch of its image.

    Splitting at special tokens first keeps the result identical to `processor(text=..., images=...)`, because the
    byte-level BPE never merges across special tokens anyway."""
    tok = processor.tokenizer
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    pixels, grids = [], []
    if images:
        out = processor.image_processor(images=[prepare_image(im, max_pixels=max_pixels) for im in images],
                                        size={"shortest_edge": MIN_PIXELS, "longest_edge": max_pixels},
                                        return_tensors="pt")
        grids = [tuple(g) for g in out["image_grid_thw"].tolist()]
        pixels = list(torch.split(out["pixel_values"], [t * h * w for t, h, w in grids]))
    n_pads = [t * h * w // 4 for t, h, w in grids]   # merge 2x2
    if text.count("<|image_pad|>") != len(images):
        raise ValueError(f"{text.count('<|image_pad|>')} image placeholders but {len(images)} images")
    ids = []
    for i, chunk in enumerate(text.split("<|image_pad|>")):
        ids += tok.encode(chunk, add_special_tokens=False) if chunk else []
        if i < len(n_pads):
            ids += [pad_id] * n_pads[i]
    return Seq(ids, [int(t == pad_id) for t in ids], pixels, grids)


def token_logprobs(model, seqs, temperature=1.0, with_entropy=False, chunk=2048, _gathered=False):
    """Per-token log-probs [B, T-1] of seqs[b].ids[1:] under the model (one forward, right padded).

    Entry t scores token t+1. Padding positions hold 0. This is the training forward of SFT and GRPO, and the
    rollout's sampler log-probs must match it (test_all.py::test_rollout_logprobs_match_training_forward).
    The vocabulary projection runs `chunk` positions at a time under checkpointing: full float32 logits of a
    16k-token 7B trajectory would be 16384 x 152064 x 4 bytes = 10 GB, twice over with the log-softmax."""
    if not _gathered and hasattr(model, "fsdp_logprobs"):   # sharded (torchrun): run as the root's forward, so
        return model.fsdp_logprobs(seqs, temperature, with_entropy, chunk)   # FSDP gathers the weights it reads
    device = next(model.parameters()).device
    batch = collate(model, seqs, device)
    hidden = model.model(**batch, use_cache=False).last_hidden_state[:, :-1]
    targets = batch["input_ids"][:, 1:]

    def score(h, tgt):   # one chunk: logits -> log-softmax -> log-prob of the target (and the entropy)
        logp_all = F.log_softmax(model.lm_head(h).float() / temperature, dim=-1)
        logp = logp_all.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        if not with_entropy:
            return logp, logp
        with torch.no_grad():   # a metric only: with a graph, its recomputed [chunk, vocab] tensors would stay
            return logp, -(logp_all.exp() * logp_all).sum(-1)   # alive to the end of backward (+1.2 GB per 1k tokens)

    parts = [torch.utils.checkpoint.checkpoint(score, hidden[:, s:s + chunk], targets[:, s:s + chunk],
                                               use_reentrant=False) if torch.is_grad_enabled()
             else score(hidden[:, s:s + chunk], targets[:, s:s + chunk]) for s in range(0, targets.shape[1], chunk)]
    live = batch["attention_mask"][:, 1:]
    logp = torch.cat([p[0] for p in parts], 1) * live
    return (logp, torch.cat([p[1] for p in parts], 1) * live) if with_entropy else logp


def rope_positions(model, seq, device=None):
    """[3, T] M-RoPE position ids of one sequence (text tokens advance by one, image tokens by their grid)."""
    ids = torch.tensor([seq.ids], device=device)
    mm = torch.tensor([seq.mm], device=device)
    grid = torch.tensor(seq.grids, device=device) if seq.grids else None
    if grid is None:   # text only: every axis is the plain index
        return torch.arange(len(seq.ids), device=device).expand(3, -1)
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid)
    return pos[:, 0]


def collate(model, seqs, device):
    """Right-pad sequences into one batch: ids, attention mask, explicit positions, and all their images."""
    T = max(len(s.ids) for s in seqs)
    pad = model.config.text_config.pad_token_id or 0
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    pos = torch.zeros((3, len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s.ids)] = torch.tensor(s.ids)
        attn[b, :len(s.ids)] = 1
        pos[:, b, :len(s.ids)] = rope_positions(model, s)
    batch = dict(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device))
    pixels = [p for s in seqs for p in s.pixels]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels).to(device)
        batch["image_grid_thw"] = torch.tensor([g for s in seqs for g in s.grids], device=device)
    return batch


def encode_plain(tok, text):
    """Token ids of untrusted text (tool output): the strings of Qwen's special tokens and of <tool_call> /
    </tool_call> are encoded as the plain text they are, never as those tokens; everything else as usual (a word
    the vocabulary has as one added token stays that token)."""
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
    """A regex that splits text at the strings of the tokenizer's special tokens (and <tool_call> / </tool_call>)."""
    strings = sorted((t for t in QWEN_ADDED if t in tok.get_vocab()), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, strings)) + ")")


# ----------------------------------------------------------------------------------------------------- images
def load_image(src, check_only=False):
    """An RGB image from a path or bytes, decoded in full (a truncated file fails here, at load, not mid-run);
    check_only: open and verify only (fast), return None. Anything unreadable raises ValueError with the reason:
    a missing or corrupt file, a non-image, a decompression bomb (a 20000 x 20000 PNG), a path that is not a str."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            if check_only:
                img.verify()
                return None
            return img.convert("RGB")
    except (OSError, ValueError, TypeError, AttributeError, SyntaxError, Image.DecompressionBombError) as e:
        what = src if isinstance(src, str) else f"({type(src).__name__})"
        raise ValueError(f"unreadable image {what}: {type(e).__name__}: {str(e)[:120]}") from e


def prepare_image(img, min_pixels=MIN_PIXELS, max_pixels=RL_MAX_PIXELS):
    """Squeeze aspect ratios > 200, upscale sides < 32 px, then smart-resize to multiples of 28 (as the original)."""
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
    hb, wb = min(hb, 200 * wb), min(wb, 200 * hb)   # rounding a thin side up to 28 can pass the processor's 200:1
    return img if (wb, hb) == img.size else img.resize((wb, hb), Image.BICUBIC)


# --------------------------------------------------------------------------------------------- checkpoints, run folders
def save_checkpoint(out, model, processor, optimizer, step, scheduler=None):
    """Weights (safetensors, hub layout) + optimizer, scheduler, step and RNG state, written to a temp folder and
    renamed into place; `trainer.json` is written last, so a folder holding it is complete. A crash at any point
    leaves a complete checkpoint that open_run finds (the old one, or the new one not yet renamed)."""
    import shutil
    from torch.distributed.checkpoint.state_dict import StateDictOptions as Options, get_model_state_dict, \
        get_optimizer_state_dict
    # whole tensors keyed by parameter name, whatever the world size (so a checkpoint resumes at any other one),
    # gathered by every rank to rank 0's memory; rank 0 writes
    full = Options(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=full) if hasattr(model, "fsdp_logprobs") else None
    if weights:   # gathered, a tied output layer is a copy of the embeddings: saved once, as save_pretrained does
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        weights = {k: v for k, v in weights.items() if not (k in tied and torch.equal(v, weights.get(tied[k])))}
    optim = get_optimizer_state_dict(model, optimizer, options=full)
    if rank() != 0:
        return os.path.join(out, "checkpoint")
    final, tmp = os.path.join(out, "checkpoint"), os.path.join(out, f"checkpoint.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    processor.save_pretrained(tmp)
    processor.tokenizer.save_pretrained(tmp)
    torch.save(dict(optimizer=optim, scheduler=scheduler.state_dict() if scheduler else None,
                    step=step, rng=torch.get_rng_state()), os.path.join(tmp, "trainer_state.pt"))
    sizes = {name: os.path.getsize(os.path.join(tmp, name)) for name in os.listdir(tmp)}
    with open(os.path.join(tmp, "trainer.json"), "w") as f:   # last: with every file's size, to check them by
        json.dump({"step": step, "sizes": sizes}, f)
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path):
    """The step of a complete checkpoint folder, or None (incomplete: a file missing or of another size than
    trainer.json recorded, say truncated; or not a checkpoint)."""
    try:
        with open(os.path.join(path, "trainer.json")) as f:
            saved = json.load(f)
        sizes = saved.get("sizes", {"config.json": None})
        whole = all(os.path.getsize(os.path.join(path, name)) == n or n is None for name, n in sizes.items())
        return saved["step"] if whole else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def model_fingerprint(name_or_path):
    """What names a model's weights by their content without reading them all (eval records it: a checkpoint is
    replaced in place at every save): a folder's config and trainer state, and of each weights file its size and
    16 slices of 64 KiB spread over it (a training step moves every trained weight). A hub name stands for itself."""
    if not os.path.isdir(name_or_path):
        return name_or_path
    digest = hashlib.sha256()
    for name in sorted(os.listdir(name_or_path)):
        path = os.path.join(name_or_path, name)
        if name.endswith((".safetensors", "config.json", "trainer.json")) and os.path.isfile(path):
            size = os.path.getsize(path)
            digest.update(f"{name} {size}".encode())
            with open(path, "rb") as f:
                for k in range(16):
                    f.seek(size * k // 16)
                    digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]


def write_atomic(path, text):
    """Replace a file's content so that a crash leaves the old content or the new, never a torn or empty file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def open_run(out, resume, overwrite=False):
    """Make the run folder safe to train into, before anything loads. -> the checkpoint to resume from, or None.
    - Recovers from a crash inside save_checkpoint: the newest complete one of checkpoint / checkpoint.old /
      checkpoint.tmp* becomes `checkpoint`; the others are removed.
    - Without --resume, refuses a folder that holds a checkpoint or metrics (--overwrite clears it): a finished run
      is never replaced by accident.
    - With --resume, drops the metrics lines of steps after the checkpoint (they are trained again)."""
    got = [_prepare_run(out, resume, overwrite) if rank() == 0 else None]
    if torch.distributed.is_initialized():   # torchrun: rank 0 prepares the folder, the others take its answer
        torch.distributed.broadcast_object_list(got)
    return got[0]


def _prepare_run(out, resume, overwrite):
    import glob
    import shutil
    final = os.path.join(out, "checkpoint")
    found = [p for p in [final, final + ".old"] + glob.glob(final + ".tmp*") if os.path.isdir(p)]
    complete = sorted((step, p) for p, step in ((p, checkpoint_step(p)) for p in found) if step is not None)
    if complete and complete[-1][1] != final:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(complete[-1][1], final)
        print(f"{out}: recovered the checkpoint of step {complete[-1][0]} left by an interrupted save", file=sys.stderr)
    for p in found:
        if p != final and os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
    metrics = os.path.join(out, "metrics.jsonl")
    if not resume:
        if os.path.isdir(final) or os.path.exists(metrics):
            if not overwrite:
                sys.exit(f"error: {out} already holds a run: pass --resume to continue it, --overwrite to start "
                         "over, or another --out")
            shutil.rmtree(final, ignore_errors=True)
            if os.path.exists(metrics):
                os.remove(metrics)
        return None
    if not os.path.isdir(final):   # nothing to resume yet: a fresh start (metrics of unsaved steps go)
        if os.path.exists(metrics):
            os.remove(metrics)
        return None
    step = checkpoint_step(final)
    if step is None:
        sys.exit(f"error: {final} is an incomplete checkpoint (a file missing or truncated): remove it, or "
                 "--overwrite")
    if os.path.exists(metrics):   # keep the lines of the steps the checkpoint holds; later ones are trained again
        with open(metrics) as f:
            kept = [line for line in f if line.endswith("\n") and (_step_of(line) or step + 1) <= step]
        write_atomic(metrics, "".join(kept))
    return final


def _step_of(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def load_checkpoint(path, model, optimizer, scheduler=None):
    """Restore the trainer state save_checkpoint wrote in `path` (the weights load with load_model(path), which maps
    the hub key layout; `model` names the optimizer's parameters); returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    trainer = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    set_optimizer_state_dict(model, optimizer, trainer["optimizer"], options=StateDictOptions(full_state_dict=True))
    if scheduler is not None and trainer["scheduler"]:
        scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"])
    return trainer["step"]


# ------------------------------------------------------------------------------------------------ more than one GPU
# Under torchrun (WORLD_SIZE > 1) sft.py and grpo.py shard the model with FSDP2 across the processes; a plain
# `python sft.py` never enters this section.
def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def dist_init():
    """-> (rank, world size). Under torchrun: join the process group (NCCL on GPUs, gloo on CPU), one GPU a
    process; otherwise (0, 1) and nothing happens."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank(), world


def shard(model):
    """FSDP2 over each decoder layer and vision block, then the root (embeddings, norms, output layer, projector).
    On GPUs the weights stay float32 (sharded, with the optimizer's moments: plain fp32 AdamW fits on 8 GPUs) and
    compute in bf16, gradients reduced in float32. The training forward (token_logprobs) becomes a forward method
    of the root, so FSDP gathers the root's weights around it, as around model(...)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)) \
        if torch.cuda.is_available() else {}
    for block in [*model.model.language_model.layers, *model.model.visual.blocks]:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    model.fsdp_logprobs = functools.partial(token_logprobs, model, _gathered=True)
    register_fsdp_forward_method(model, "fsdp_logprobs")
    return model


@torch.no_grad()
def copy_weights(src, dst):
    """dst's weights := src's, one tensor at a time (a sharded one gathered from every rank): GRPO's rollout runs on
    a full bf16 copy of the policy, refreshed after each update."""
    target = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        target[name].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)


def all_mean(metrics, sums=()):
    """Metrics averaged over the ranks (the keys in `sums` added up), before rank 0 logs them."""
    if not torch.distributed.is_initialized():
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    world = torch.distributed.get_world_size()
    return dict(metrics, **{k: v if k in sums else v / world for k, v in zip(keys, t.tolist())})


# ----------------------------------------------------------------------------------------------------- training helpers
def apply_preset(ap, args, argv, preset):
    """A preset's values (--tiny) for the flags the user did not give: a flag given explicitly wins, even when its
    value equals the default (`--tiny --lr 1e-5` trains at 1e-5)."""
    defaults = {a.dest: a.default for a in ap._actions}
    for a in ap._actions:   # parse again with every default hidden: what remains was given
        a.default = argparse.SUPPRESS
    try:
        given = vars(ap.parse_args(argv))
    finally:
        for a in ap._actions:
            a.default = defaults[a.dest]
    for k, v in preset.items():
        if k not in given:
            setattr(args, k, v)


def check_args(ap, args, positive=(), fraction=(), at_most=None):
    """Refuse, before anything loads, the values that would do nothing, lose data, divide by zero or train on NaN:
    every number must be finite; `positive` ones > 0, `fraction` ones in [0, 1], `at_most` {name: bound} no higher;
    a --out that names a file, and a --data that is not a file, are refused too."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            ap.error(f"--{name.replace('_', '-')} must be a finite number (got {value})")
    for name, bound in (at_most or {}).items():
        if getattr(args, name) > bound:
            ap.error(f"--{name.replace('_', '-')} must be at most {bound} (got {getattr(args, name)})")
    if getattr(args, "out", None) and os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out} is a file, not a folder")
    if getattr(args, "data", None) and os.path.exists(args.data) and not os.path.isfile(args.data):
        ap.error(f"--data {args.data} is not a file")
    for name in positive:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    for name in fraction:
        if not 0 <= getattr(args, name) <= 1:
            ap.error(f"--{name.replace('_', '-')} must be between 0 and 1 (got {getattr(args, name)})")


def finite_step(opt, params, grad_clip):
    """Clip the gradient and step, unless it is not finite: then the step is skipped (the caller counts it), so a
    NaN never reaches the weights or a checkpoint. -> (grad norm, whether the optimizer stepped)."""
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)   # sharded: one global norm
    if math.isfinite(gnorm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm, math.isfinite(gnorm)


def set_gradient_checkpointing(model):
    """Trade compute for memory in training forwards (the 7B needs it at 16k-token trajectories)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


class AdamW(torch.optim.Optimizer):
    """AdamW whose updates survive bf16 weights: each step is computed in float32 and written back with stochastic
    rounding (on float32 weights it is plain AdamW). Why: at lr 1e-5 an Adam step moves a weight by ~1e-5, while half
    a bf16 ulp of a typical 7B weight (0.02) is 6e-5, so round-to-nearest drops most updates and torch's AdamW on
    bf16 weights barely trains. fp32 master weights fix that too, but their 4 bytes per parameter (30 GB for the 7B
    language model) do not fit on one 80 GB GPU next to the moments; stochastic rounding costs no memory and is
    unbiased. The moments are kept in the weights' dtype, rounded the same way."""
    CHUNK = 2**24   # elements per slice: the 7B's 545M-entry embedding would need ~15 GB of float32 temporaries

    def __init__(self, params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _write(dst, src):
        if dst.dtype == torch.bfloat16:   # add uniform noise below the 16 bits bf16 drops, then drop them
            bits = src.view(torch.int32) + torch.randint_like(src, 0, 1 << 16, dtype=torch.int32)
            src = (bits & -65536).view(torch.float32)
        dst.copy_(src)

    @torch.no_grad()
    def step(self, closure=None):   # closure: the Optimizer interface (torch's state-dict tools pass None)
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                # elementwise, so a sharded (FSDP) parameter is updated shard by shard, each on its own rank
                local = lambda x: x.to_local() if hasattr(x, "to_local") else x
                for i in range(0, local(p).numel(), self.CHUNK):   # float32 temporaries of one slice at a time
                    view = lambda x: local(x).view(-1)[i:i + self.CHUNK]
                    g = view(p.grad).float()
                    m = view(state["exp_avg"]).float().lerp_(g, 1 - b1)
                    v = view(state["exp_avg_sq"]).float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                    new = view(p).float().mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                    for dst, src in ((p, new), (state["exp_avg"], m), (state["exp_avg_sq"], v)):
                        self._write(view(dst), src)


def measure_step(step, opt, device, tokens):
    """Time and peak memory of one training step for the benches: the second call is measured (the first allocates
    the optimizer state). -> dict(step_s, tokens_per_s, peak_gib); peak "OOM" when it does not fit."""
    cuda = str(device).startswith("cuda")
    try:
        for _ in range(2):
            if cuda:
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return dict(step_s=None, tokens_per_s=0, peak_gib="OOM")
    return dict(step_s=round(dt, 2), tokens_per_s=round(tokens / dt),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None)


# ----------------------------------------------------------------------------------------------------- data files
def jsonl_lines(path):
    """(line number, bytes) of each non-empty line of a JSONL file, decoded by `kept_rows` (a line that is not
    UTF-8 is a bad row there, not a file that cannot be read)."""
    with open(path, "rb") as f:
        return [(n, line) for n, line in enumerate(f, 1) if line.strip()]


def kept_rows(rows, parse, path, what):
    """[parse(row, n)] over (n, row) pairs, a JSONL line (bytes) decoded here. A row that is not JSON (nor UTF-8,
    or nested past the parser's stack) or that `parse` rejects (a missing or mistyped field, an unreadable image) is
    reported with its line number, skipped and counted: one bad row never stops a run. SFT conversations, RL prompts
    and benchmark items are all read so."""
    out, bad = [], 0
    for n, row in rows:
        try:
            out.append(parse(json.loads(row) if isinstance(row, (str, bytes)) else row, n))
        except (ValueError, KeyError, TypeError, AttributeError, SyntaxError, RecursionError) as e:
            why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            print(f"{path}:{n}: skipped ({why[:200]})", file=sys.stderr)
            bad += 1
    if bad:
        print(f"{path}: {bad} bad rows skipped, {len(out)} {what} kept", file=sys.stderr)
    return out


def progress(done, total, note="", file=None):
    """A one-line progress bar, redrawn in place: [#####.....] done/total note."""
    filled = 30 * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {note}", end="", flush=True,
          file=file or sys.stdout)


def _train_tokenizer(vocab_size, corpus, words=()):
    """Byte-level BPE trained on the project's own text, pre-tokenised as Qwen2's, with Qwen's special tokens:
    protocol tags are plain text here too (split into several tokens), `<tool_call>` / `</tool_call>` added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([   # Qwen2's split: digits one by one, punctuation runs apart
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    tok.add_tokens([AddedToken(w, single_word=True) for w in words])   # whole words kept as one token
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=32768)


def qwen_tokenizer(ranks_path=None):
    """The real Qwen2 / Qwen2.5 tokenizer rebuilt offline from its 151,643 byte-level BPE ranks (the file
    qwen.tiktoken that the PyPI package qwen-agent ships, Apache-2.0): the same ids as Qwen2.5-VL's vocab.json.
    Each token's merge is the pair that BPE over its own bytes ends on, with lower ranks only. For tests that must
    see the real merges (`>\n`, `></`, `"}}`); the real model brings its own tokenizer from the hub."""
    import base64
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    if ranks_path is None:
        import importlib.util
        spec = importlib.util.find_spec("qwen_agent")   # located, not imported (its dependencies are not needed)
        if spec is None:
            raise FileNotFoundError("the real Qwen vocabulary needs qwen.tiktoken: pip install --no-deps qwen-agent")
        ranks_path = os.path.join(os.path.dirname(spec.origin), "utils", "qwen.tiktoken")
    with open(ranks_path, "rb") as f:
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
    char = bytes_to_unicode()
    text = lambda b: "".join(char[x] for x in b)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([x]) for x in token]
        while len(parts) > 2:   # BPE over the token's bytes, merging the lowest-ranked pair below its own rank
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], 1 << 30))
            if ranks.get(parts[i] + parts[i + 1], 1 << 30) >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((text(parts[0]), text(parts[1])))
    tok = Tokenizer(models.BPE({text(b): r for b, r in ranks.items()}, merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=t not in ("<tool_call>", "</tool_call>"), normalized=False)
                    for t in QWEN_ADDED])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=32768)


def project_text():
    """The corpus the tiny tokenizer is trained on: this project's source files and its data/ text."""
    here = os.path.dirname(os.path.abspath(__file__))
    texts = []
    for root in (here, os.path.join(here, "data")):
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if name.endswith((".py", ".md", ".txt", ".jsonl")) and os.path.getsize(os.path.join(root, name)) < 4e6:
                with open(os.path.join(root, name), encoding="utf-8", errors="ignore") as f:
                    texts.append(f.read())
    return texts


def build_tiny(path, preset="test", seed=0, corpus=None, words=(), tokenizer=None, vocab_rows=None):
    """A Qwen2.5-VL in miniature with random weights: real patch/merge sizes and M-RoPE, saved like the hub repo.
    `words` become single tokens (the miniature world's names, as a real tokenizer has common names as tokens);
    `tokenizer` (e.g. qwen_tokenizer()) replaces the small one trained here; `vocab_rows` pads the embedding past
    the tokenizer as the 7B does (152,064 rows for 151,665 tokens)."""
    p = TINY_PRESETS[preset]
    tokenizer = tokenizer or _train_tokenizer(p["vocab"], corpus or project_text(), words)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = p["hidden"] // p["heads"]
    half = head_dim // 2   # mrope_section must sum to head_dim / 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=max(len(tokenizer), vocab_rows or 0), hidden_size=p["hidden"],
                         num_hidden_layers=p["layers"],
                         num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                         intermediate_size=p["inter"], max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=section),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=p["vis_depth"], hidden_size=p["vis_hidden"], intermediate_size=2 * p["vis_hidden"],
                           num_heads=2, out_hidden_size=p["hidden"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, fullatt_block_indexes=[p["vis_depth"] - 1], window_size=112),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Embeddings at std 1/sqrt(hidden), not the 7B's 0.02: tied, they are also the output projection, and at 0.02 a
    # 256-wide model's logits stay within ~5 of each other, so even a well-trained tiny model keeps its probability
    # spread over the vocabulary and samples broken protocol at temperature 1 (measured: entropy 1.1 on SFT tokens).
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, p["hidden"] ** -0.5)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               min_pixels=MIN_PIXELS, max_pixels=RL_MAX_PIXELS)
    processor = Processor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", metavar="DIR", required=True, help="build a tiny random Qwen2.5-VL into DIR and check it")
    ap.add_argument("--preset", default="test", choices=sorted(TINY_PRESETS), help="tiny model size preset")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = ap.parse_args()
    build_tiny(args.tiny, args.preset, args.seed)
    model, processor = load_model(args.tiny, device="cpu")
    seq = encode(processor, f"<|im_start|>user\n{IMAGE_PLACEHOLDER}What is this?<|im_end|>\n",
                 [Image.new("RGB", (64, 64), "red")])
    lp = token_logprobs(model, [seq])
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny model ({args.preset}, {n / 1e6:.2f}M params) in {args.tiny}: {len(seq.ids)} tokens, "
          f"mean log-prob {lp.sum().item() / (len(seq.ids) - 1):.3f}")


if __name__ == "__main__":
    main()
