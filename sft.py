"""sft.py -- the cold start: supervised fine-tuning on clean tool-use trajectories, loss only on the
model's turns.

RL straight from the base model did not give stable tool use (the paper's cold-start section), so
the agent first imitates trajectories written by a strong model: it learns the protocol here, and
GRPO later learns when to use which tool.

Data (JSONL, one trajectory per line; images by path relative to the file, one "<image>" per image,
in order; a tool output is a user turn, data/PROTOCOL.md):
  {"images": ["img/1.png", ...],
   "messages": [{"role": "system", "content": "..."},
                {"role": "user", "content": "<image>question ..."},
                {"role": "assistant", "content": "<think>...</think><code>...</code>"},
                {"role": "user", "content": "Code execution result: ..."},
                {"role": "assistant", "content": "<think>...</think><answer>...</answer>"}]}

The tokens are exactly the ones the rollout produces for the same conversation, segment by segment
(test_all.py checks it on the tiny and the real Qwen vocabulary): a tool output is encoded as the
rollout's observation, pre-filled `<think>` included. Labels are the rollout's action mask plus the
`<|im_end|>` that closes each tool turn (the original trains on it; in a rollout the observation
writes it, because generation stops at `</code>`).

Deliberate choices:
- Loss = sum of token losses / label tokens of the whole accumulation window (not a mean of
  per-sample means: that over-weights short samples, the gradient-accumulation bug HF fixed in
  2024).
- The vocabulary projection is chunked (model.token_logprobs): a 20k-token sample never materialises
  its logits.
- Over-long samples (> --cutoff tokens) are skipped and counted rather than truncated (a cut
  trajectory would teach the model to stop mid-protocol).
- --tiny freezes the token embeddings (the paper trains all LLM weights). The tiny model's
  vocabulary is mostly town names known only from its recall pre-training (data/world.py); SFT on
  the training towns reshaped their embeddings and the model then copied no held-out town into a
  search query (teacher-forced, 0% vs 100% frozen).

Commands:
  python sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --data sft.jsonl --out runs/sft   # the paper's
  python sft.py --tiny --model runs/mini/base --data data/world/sft.jsonl --out runs/sft   # CPU
  python -m support.convert sft DeepEyesV2_SFT.json --images-root DIR --out sft.jsonl  # the release
  torchrun --nproc_per_node 8 sft.py --model ... --data ... --out ...   # 8 GPUs: FSDP2 (README)
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch

import model as M
from support import dist, flags, optim, reading, runs
from tools import IMAGE_PLACEHOLDER


# ================================================================================== tokens + labels
def encode_conversation(processor, messages, images, max_pixels=M.SFT_MAX_PIXELS):
    """-> (Seq, labels): the rollout's token stream for this conversation, labels 1 on the model's
    own tokens.

    Encoded by the rollout's segments, one after the other: the prompt, each model turn, each
    observation ending in its pre-filled `<think>`. Not the whole text at once: with the real
    vocabulary `<think>`'s `>` merges with the turn after it (`>\\n`, `><`), and the rollout never
    sees that merge."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    # our data holds string contents
    text = lambda m: m["content"].replace("<image>", IMAGE_PLACEHOLDER)
    head = processor.apply_chat_template([dict(m, content=text(m)) for m in messages[:first]],
                                         tokenize=False, add_generation_prompt=True)
    segments, observation = [(head, 0)], []
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for m in messages[first:last + 1]:
        # a tool output (or any user turn): the rollout's observation tokens
        if m["role"] != "assistant":
            observation.append(text(m))
            continue
        content = text(m)
        # close the previous turn (trained on), then the observation (not)
        if observation:
            prefill = "<think>" if content.startswith("<think>") else ""
            segments += [("<|im_end|>", 1),
                         ("".join(f"\n<|im_start|>user\n{o}<|im_end|>" for o in observation)
                          + "\n<|im_start|>assistant\n" + prefill, 0)]
            content, observation = content[len(prefill):], []
        segments.append((content, 1))
    segments.append(("<|im_end|>", 1))   # the final turn ends with the model's own EOS
    seq, labels, todo = M.Seq([], []), [], list(images)
    for chunk, label in segments:
        n = chunk.count("<|image_pad|>")
        part = M.encode(processor, chunk, todo[:n], max_pixels=max_pixels)
        todo = todo[n:]
        seq.extend(part)
        labels += [label if not mm else 0 for mm in part.mm]   # image pads are never trained on
    if todo:
        raise ValueError(f"{len(images)} images but {len(images) - len(todo)} placeholders")
    return seq, labels


# ========================================================================================= training
def sft_step(model, opt, sched, window, grad_clip, rank=0, world=1, micro=1):
    """One optimizer step over an accumulation window of (Seq, labels): the loss is a token mean
    over the window. micro: samples per forward (1, the paper's; the window's sum is the same,
    padding is masked out)."""
    n_labels = sum(sum(lab) for _, lab in window)
    total = 0.0
    # torchrun: this rank's share of the window, padded with weight-0 repeats so every rank runs as
    # many forwards; x world because FSDP averages the ranks' gradients: the sum over ranks is the
    # one-GPU token mean
    share = window[rank::world]
    share = [(s, lab, world) for s, lab in share] + \
        [(*window[0], 0)] * (-(-len(window) // world) - len(share))
    for i in range(0, len(share), micro):
        chunk = share[i:i + micro]
        logp = M.token_logprobs(model, [seq for seq, _, _ in chunk])
        mask = torch.zeros_like(logp)
        for b, (seq, labels, weight) in enumerate(chunk):
            # <- the model's tokens; logp[:, k] scores token k+1 (predicted from the tokens
            # before it), so the labels shift by one
            mask[b, :len(labels) - 1] = torch.tensor(labels[1:], dtype=logp.dtype) * weight
        loss = -(logp * mask).sum() / n_labels
        loss.backward()
        total += loss.item() / world
    gnorm, stepped = optim.finite_step(opt, [p for p in model.parameters() if p.requires_grad],
                                       grad_clip)
    # the schedule moves on either way: a skipped step is a lost step, not a delayed one
    sched.step()
    return total, gnorm, stepped


def train(args):
    # torchrun: this process's rank and the number of processes; else (0, 1)
    rank, world = dist.dist_init()
    torch.manual_seed(args.seed)
    data = load_conversations(args.data)
    if not data:
        sys.exit(f"error: no usable conversations in {args.data}")
    # recovers, refuses to overwrite, trims metrics
    ckpt = runs.open_run(args.out, args.resume, args.overwrite)
    model, processor = M.load_model(ckpt or args.model, dtype=torch.float32 if world > 1 else None)
    if not args.unfreeze_vision:
        freeze_vision(model)
    if args.freeze_embeddings:   # tied: the output projection too
        model.get_input_embeddings().weight.requires_grad_(False)
    if args.grad_ckpt:
        M.set_gradient_checkpointing(model)
    if world > 1:
        dist.shard(model)
    positions = order(len(data), args.epochs, args.seed)
    # the schedule's length; --steps may stop earlier
    total = math.ceil(len(positions) / args.grad_accum)
    stop = min(args.steps, total)
    opt = optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    sched = cosine_with_warmup(opt, total, max(1, round(args.warmup * total)))
    step = runs.load_checkpoint(ckpt, model, opt, sched) if ckpt else 0
    os.makedirs(args.out, exist_ok=True)
    skipped, bad_steps, model = 0, 0, model.train()
    for step in range(step, stop):
        t0, window = time.time(), []
        for p in positions[step * args.grad_accum:(step + 1) * args.grad_accum]:
            messages, paths = data[p]
            try:
                images = [M.load_image(x) for x in paths]
                seq, labels = encode_conversation(processor, messages, images, args.max_pixels)
            # checked at load; a file that changed since is skipped and counted too
            except ValueError as e:
                print(f"\n{args.data}: conversation {p + 1} skipped ({e})", file=sys.stderr)
                skipped += 1
                continue
            if len(seq.ids) > args.cutoff or sum(labels) == 0:
                skipped += 1   # counted, never truncated
                continue
            window.append((seq, labels))
        loss, gnorm, stepped = sft_step(model, opt, sched, window, args.grad_clip, rank, world,
                                        args.micro_batch) if window else (float("nan"), 0.0, False)
        bad_steps += bool(window) and not stepped
        dt = time.time() - t0
        tokens = sum(len(s.ids) for s, _ in window)
        metrics = dist.all_mean(dict(step=step + 1, loss=loss, lr=sched.get_last_lr()[0],
                                     grad_norm=gnorm, tokens=tokens, tokens_per_s=tokens / dt,
                                     skipped=skipped, non_finite_steps=bad_steps, seconds=dt),
                                sums=("loss",))
        if rank == 0:   # torchrun: one process writes
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            reading.progress(step + 1, total, f"steps, loss {metrics['loss']:.4f} lr "
                             f"{metrics['lr']:.2e} {tokens / dt:.0f} tok/s skipped {skipped}")
        if (step + 1) % args.save_every == 0 or step + 1 == stop:
            runs.save_checkpoint(args.out, model, processor, opt, step + 1, sched)
    print()
    return model


# ============================================================================================= data
def load_conversations(path):
    """JSONL rows {images, messages} -> list of (messages, image paths). Bad rows are reported and
    skipped."""
    root = os.path.dirname(os.path.abspath(path))

    def conversation(row, n):
        messages, images = row["messages"], [os.path.join(root, p) for p in row.get("images") or []]
        roles = ("system", "user", "assistant")
        if not isinstance(messages, list) or not all(
                isinstance(m.get("content"), str) and m.get("role") in roles for m in messages):
            raise ValueError("messages must be a list of {role, content: str}")
        for m in messages:
            M.refuse_special_text(m["content"], f"a {m['role']} message")
        holes = sum(m["content"].count("<image>") for m in messages)
        if holes != len(images):
            raise ValueError(f"{holes} <image> placeholders but {len(images)} images")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant turn")
        if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
            # it would teach the model to end its turn at once
            raise ValueError("an empty assistant turn")
        for image in images:
            M.load_image(image, check_only=True)   # each file opened and checked once, here
        return messages, images
    return reading.kept_rows(reading.jsonl_lines(path), conversation, path, "conversations")


# ================================================================================= training helpers
def freeze_vision(model):
    """The vision tower and its projector (`visual.merger`) stay as pretrained, as in the paper."""
    for p in model.model.visual.parameters():
        p.requires_grad_(False)


def order(n, epochs, seed):
    """Sample index of every data position: a fresh seeded shuffle per epoch (so a resume replays it
    exactly)."""
    out = []
    for e in range(math.ceil(epochs)):
        perm = list(range(n))
        random.Random(seed * 1000 + e).shuffle(perm)
        out += perm
    return out[:int(n * epochs)]


def cosine_with_warmup(opt, total, warmup):
    def lr_scale(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=M.DEFAULT_MODEL,
                    help="model to start from: hub name or local folder")
    ap.add_argument("--data", help="SFT conversations JSONL (see the module docstring)")
    ap.add_argument("--out", default="runs/sft", help="checkpoint and metrics folder")
    ap.add_argument("--epochs", type=float, default=3, help="passes over the data")
    ap.add_argument("--lr", type=float, default=1e-5,
                    help="peak AdamW learning rate (cosine schedule)")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--grad-accum", type=int, default=4, help="samples per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=1, help="samples per forward, padded (1: "
                    "the paper's, and what fits a 20k-token 7B sample; --tiny: 2, faster on CPU)")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    ap.add_argument("--cutoff", type=int, default=20480,
                    help="skip (and count) samples longer than this many tokens")
    ap.add_argument("--max-pixels", type=int, default=M.SFT_MAX_PIXELS, help="pixel cap per image")
    ap.add_argument("--unfreeze-vision", action="store_true",
                    help="also train the vision tower and projector")
    ap.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the token embeddings (and the tied output projection) fixed "
                    "(default: off; --tiny: on)")
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                    help="gradient checkpointing")
    ap.add_argument("--steps", type=int, default=10**9, help="stop after this many optimizer steps")
    ap.add_argument("--save-every", type=int, default=500,
                    help="checkpoint every N optimizer steps (and at the end)")
    ap.add_argument("--resume", action="store_true",
                    help="continue exactly from the checkpoint in --out")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over in an --out that already holds a run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data order")
    ap.add_argument("--tiny", action="store_true", help="CPU preset: lr 3e-4, 6 epochs, accum 2 in "
                    "one forward, frozen embeddings, no checkpointing")
    args = ap.parse_args(argv)
    if args.tiny:
        preset = dict(lr=3e-4, epochs=6, grad_accum=2, micro_batch=2, grad_ckpt=False,
                      save_every=200, freeze_embeddings=True)
        flags.apply_preset(ap, args, argv, preset)
    flags.check_args(ap, args, positive=("epochs", "lr", "grad_accum", "micro_batch", "grad_clip",
                                         "cutoff", "max_pixels", "steps", "save_every"),
                     fraction=("warmup", "weight_decay"), at_most=dict(lr=1.0, epochs=1000))
    return args


def main():
    args = parse_args()
    if not args.data or not os.path.isfile(args.data):
        sys.exit(f"error: SFT data {args.data!r} not found: convert the released json with "
                 "`python -m support.convert sft FILE --images-root DIR --out FILE`, or build the "
                 "miniature world with `python data/world.py`")
    train(args)


if __name__ == "__main__":
    main()
