"""grpo.py -- reinforcement learning over multi-turn tool rollouts: the paper's reward and GRPO.

  compute_reward(response, answer, source)  the original's: 0.8 accuracy + 0.2 format, search cost
  group_advantages(rewards, group, sound)   (r - group mean) / (unbiased group std + 1e-6)
  policy_loss(logp, old_logp, adv, mask)    PPO clip 0.2 / 0.2, dual clip 3.0, token mean a sequence

The loop: prompts -> rollout n per prompt -> rewards (judge calls in parallel) -> old log-probs
recomputed by the trainer -> mini-batch updates -> metrics JSONL -> atomic, resumable checkpoint
(--keep-best: the best validated one too). Defaults are the paper's.

The reward is the original's, judge prompts and verdicts included (data/PROTOCOL.md, Reward);
without a judge the rules decide (support/scoring.py, which eval uses too). As the authors ran it:
no KL and no reference model, no entropy bonus, zero-variance groups kept (advantage 0). Deliberate
choice: trajectories that hit an infrastructure error (sandbox or search backend down, judge
unreachable or without a verdict) get advantage 0 and stay out of their group's statistics: they
are counted, never learned from (the original scored them as wrong answers).

Commands:
  python grpo.py --model PATH --data rl_data/rl.jsonl --judge-url URL \
      --image-search-cache FILE                                   # the paper's
  python grpo.py --tiny --model runs/mini/sft/checkpoint --data data/world/rl.jsonl \
      --out runs/grpo --prompt data/world/world_system_prompt.txt   # CPU, the miniature world
  torchrun --nproc_per_node 8 grpo.py --model PATH --data ...     # 8 GPUs: FSDP2 (README)
"""
import argparse
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import model as M
from support import dist, flags, optim, reading, runs
import rollout as R
import tools
from support.scoring import JudgeError, LLMJudge, normalize_final_answer, rule_score


# ======================================================================================== GRPO core
def group_advantages(rewards, group_size, sound=None):
    """(r - mean of its group) / (unbiased std of the group + 1e-6), the statistics taken over the
    group's sound trajectories only (`sound`: False where an infrastructure error broke one). A
    broken trajectory, and every one of a group with fewer than two sound, gets 0: it is never
    learned from, nor does its reward move the others'."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    ok = torch.ones_like(r, dtype=torch.bool) if sound is None else \
        torch.as_tensor(sound, dtype=torch.bool).view(-1, group_size)
    adv = torch.zeros_like(r)
    for g in range(len(r)):
        x = r[g][ok[g]]
        if len(x) >= 2:
            adv[g][ok[g]] = (x - x.mean()) / (x.std(unbiased=True) + 1e-6)
    return adv.view(-1)


def policy_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0):
    """PPO-clip with dual clip, per token; mean over each sequence's model tokens, then over
    sequences. logp, old_logp, mask: [B, T]; adv: [B] (broadcast to every model token). Returns
    (loss, clip fraction)."""
    log_ratio = (logp - old_logp).clamp(-20, 20)
    ratio = log_ratio.exp()
    a = adv[:, None]
    clipped = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high))
    # dual clip: cap at 3|A|
    per_token = torch.where(a < 0, torch.minimum(clipped, dual_clip * a.abs()), clipped)
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    clip_frac = (((ratio - 1).abs() > clip_low).float() * mask).sum() / mask.sum().clamp(min=1)
    return per_seq.mean(), clip_frac


# ========================================================================================= the loop
def train(args):
    rank, world = dist.dist_init()   # torchrun: this process's rank and the number of them
    if world > 1 and (args.prompts % world or args.mini_batch % world):
        sys.exit(f"error: with {world} processes --prompts and --mini-batch must divide by {world} "
                 "(each rank rolls out whole groups of an equal share)")
    torch.manual_seed(args.seed + rank)
    samples = load_prompts(args.data)
    if not samples:
        sys.exit(f"error: no usable RL prompts in {args.data}")
    ckpt = runs.open_run(args.out, args.resume, args.overwrite)   # recovers; never overwrites
    model, processor = M.load_model(ckpt or args.model, dtype=torch.float32 if world > 1 else None)
    sampler = model   # the rollout's model; under torchrun a full bf16 copy (FSDP shards `model`)
    if args.grad_ckpt:
        M.set_gradient_checkpointing(model)
    if args.freeze_embeddings:   # tied: the output projection too (why: sft.py's docstring)
        model.get_input_embeddings().weight.requires_grad_(False)
    random.Random(args.seed).shuffle(samples)   # a batch mixes sources, the same order on a resume
    if world > 1:
        sampler = M.load_model(ckpt or args.model)[0]
        dist.shard(model)
    opt = optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                      weight_decay=args.weight_decay)
    step = runs.load_checkpoint(ckpt, model, opt) if ckpt else 0
    judge = LLMJudge(args.judge_url, args.judge_model) if args.judge_url else None
    prompt = R.load_prompt(args.prompt)   # for rows that carry no prompt of their own
    image_cache = args.image_search_cache and tools.ImageSearchCache(
        args.image_search_cache, end_on_miss=args.image_search_miss == "end")
    val = load_prompts(args.val_data)[rank::world] if args.val_data else []
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    # --keep-best: the best validation so far (on a resume: in the metrics of the steps kept)
    best = max([json.loads(line).get("val_acc", -1.0) for line in open(metrics_path)]
               if ckpt and os.path.exists(metrics_path) else [], default=-1.0)
    n_batches = min(args.steps, math.ceil(len(samples) * args.epochs / args.prompts))
    limits = dict(max_turns=args.max_turns, search_url=args.search_url, prompt=prompt,
                  max_response_tokens=args.max_response_tokens, max_pixels=args.max_pixels,
                  max_turn_tokens=args.max_turn_tokens, image_search_cache=image_cache)
    for step in range(step, n_batches):
        t0 = time.time()
        prompts = [samples[(step * args.prompts + k) % len(samples)] for k in range(args.prompts)]
        prompts = prompts[rank::world]   # torchrun: each rank rolls out whole groups of its share
        sampler.eval()
        trajs = R.rollout(sampler, processor, prompts, n=args.group, temperature=args.temperature,
                          top_p=args.top_p, **limits)
        t1 = time.time()
        score_all(trajs, judge, args.judge_mode)
        rollout_metrics = batch_metrics(trajs)
        # <- the advantage, over each group's sound trajectories (a broken tool: never learned from)
        adv = group_advantages([t.reward["score"] for t in trajs], args.group,
                               [not t.infra_errors for t in trajs])
        t2 = time.time()
        model.train()
        upd = grpo_update(model, opt, trajs, adv, args, world)
        if sampler is not model:
            dist.copy_weights(model, sampler)   # the rollout's copy takes the updated weights
        times = dict(t_rollout=t1 - t0, t_reward=t2 - t1, t_update=time.time() - t2)
        # the held-out check, as the launch script's (verl: every val_every batches and the last)
        if val and ((step + 1) % args.val_every == 0 or step + 1 == n_batches):
            upd.update(validate(sampler, processor, val, judge, limits))
        metrics = dist.all_mean(dict(step=step + 1, **rollout_metrics, **upd, **times),
                                sums=("infra_errors", "non_finite_steps"))
        if rank == 0:   # torchrun: one process writes
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            calls = metrics["code_calls"] + metrics["search_calls"] + metrics["image_search_calls"]
            print(f"\rstep {step + 1}/{n_batches} reward {metrics['reward']:.3f} acc "
                  f"{metrics['acc']:.3f} tools {calls:.2f} len {metrics['response_tokens']:.0f} "
                  f"({time.time() - t0:.1f}s)", end="", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == n_batches:
            runs.save_checkpoint(args.out, model, processor, opt, step + 1)
        if args.keep_best and metrics.get("val_acc", -1.0) > best:   # of equals, the first
            best = metrics["val_acc"]
            runs.save_checkpoint(os.path.join(args.out, "best"), model, processor, opt, step + 1)
    print()
    return model


def grpo_update(model, opt, trajs, adv, args, world=1):
    """One rollout batch -> len(trajs) / (mini_batch * group) optimizer steps, 1 epoch. Returns step
    metrics. Under torchrun each rank holds 1/world of every mini-batch; FSDP averages the ranks'
    gradients of their own sequence means, which is the one-GPU mean over the whole mini-batch (the
    shares are equal)."""
    dev = next(model.parameters()).device
    micro, per_step = args.micro_batch, args.mini_batch * args.group // world
    # by length within each optimizer step (the same sum, so the same step): micro-batches pad less
    order = sorted(range(len(trajs)), key=lambda k: (k // per_step, len(trajs[k].seq.ids)))
    trajs, adv = [trajs[k] for k in order], adv[order]
    params = [p for p in model.parameters() if p.requires_grad]
    # each optimizer step's trajectories that run a forward: one of advantage 0 has loss 0 whatever
    # its ratio, so gradient 0, and is skipped (torchrun: not; FSDP needs equal forwards per rank)
    steps = [[k for k in range(s, min(s + per_step, len(trajs))) if adv[k] or world > 1]
             for s in range(0, len(trajs), per_step)]
    # old log-probs are the trainer's before this batch's first step: for that step, its own
    # forward, detached (ratio exactly 1); the later steps' are recomputed now, before any moves
    later = [k for ks in steps[1:] for k in ks]
    old = dict(zip(later, recompute_logprobs(model, [trajs[k] for k in later], micro,
                                             args.temperature)))
    stats = []
    for n, ks in enumerate(steps):
        opt.zero_grad(set_to_none=True)
        if not ks:   # every advantage 0: the gradient is 0, the optimizer steps as the original's
            for p in params:
                p.grad = torch.zeros_like(p)
            gnorm = optim.finite_step(opt, params, args.grad_clip)[0]
            stats.append(dict(clip_frac=0.0, grad_norm=gnorm, non_finite_steps=0.0))
            continue
        clip, ent = [], []
        for i in range(0, len(ks), micro):
            chunk = [trajs[k] for k in ks[i:i + micro]]
            # the policy scored is the one sampled: logits over the rollout's temperature
            logp, entropy = M.token_logprobs(model, [t.seq for t in chunk], args.temperature,
                                             with_entropy=True)
            T = logp.shape[1]
            mask = torch.zeros_like(logp)
            for b, t in enumerate(chunk):   # tool outputs and image pads: context, never loss
                # logp[:, k] scores token k+1 (predicted from the ones before it): the mask
                # shifts by one
                mask[b, :len(t.action_mask) - 1] = torch.tensor(t.action_mask[1:], dtype=mask.dtype)
            pad = lambda lp: torch.nn.functional.pad(lp, (0, T - len(lp)))
            old_lp = logp.detach() if n == 0 else \
                torch.stack([pad(old[k]) for k in ks[i:i + micro]]).to(dev)
            loss, cf = policy_loss(logp, old_lp, adv[ks[i:i + micro]].to(dev), mask,
                                   args.clip_low, args.clip_high, args.dual_clip)
            # sequences weigh the same in the mini-batch's mean (the skipped ones count, as 0)
            (loss * len(chunk) / min(per_step, len(trajs) - n * per_step)).backward()
            clip.append(cf.item())
            ent.append(((entropy * mask).sum() / mask.sum().clamp(min=1)).item())
        gnorm, stepped = optim.finite_step(opt, params, args.grad_clip)
        stats.append(dict(clip_frac=sum(clip) / len(clip), entropy=sum(ent) / len(ent),
                          grad_norm=gnorm, non_finite_steps=float(not stepped)))
    keys = dict.fromkeys(k for d in stats for k in d)   # entropy: of the steps that ran a forward
    out = {k: sum(d[k] for d in stats if k in d) / sum(k in d for d in stats) for k in keys}
    out["non_finite_steps"] = sum(d["non_finite_steps"] for d in stats)   # skipped: a count
    return out


def score_all(trajs, judge=None, judge_mode="all", workers=16):
    """Rewards for every trajectory, judge calls in parallel; judge failures counted, not scored."""
    def one(t):
        try:
            t.reward = compute_reward(t.response, t.sample.answer, t.sample.data_source,
                                      t.sample.question, judge, judge_mode)
        except JudgeError:
            t.infra_errors += 1
            t.reward = dict(score=0.0, acc=0.0, format=0.0, judged=False)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, trajs))


def validate(sampler, processor, samples, judge, limits):
    """Accuracy on the validation prompts (the launch script: V*, every 4 batches), greedy, one
    sample each: right when the answer is the gold or starts with it, else as the judge (without
    one, the rules) says. A judge failure is counted apart, never scored."""
    right, failed = 0, 0
    for t in R.rollout(sampler, processor, samples, temperature=0, **limits):
        pred, gold = (t.answer or "").strip(), t.sample.answer
        try:
            right += bool(pred) and (pred.lower().startswith(gold.lower()) or bool(
                judge.perception(t.sample.question, gold, pred) if judge else
                rule_score(pred, gold, t.sample.question)))
        except JudgeError:
            failed += 1
    return dict(val_acc=right / max(len(samples) - failed, 1), val_judge_errors=failed)


@torch.no_grad()
def recompute_logprobs(model, trajs, micro, temperature):
    """Old log-probs by the trainer's own forward (not the sampler's): the ratio starts at 1."""
    out = []
    for i in range(0, len(trajs), micro):
        lp = M.token_logprobs(model, [t.seq for t in trajs[i:i + micro]], temperature)
        out += [row[:len(t.seq.ids) - 1].cpu() for row, t in zip(lp, trajs[i:i + micro])]
    return out   # one [len - 1] tensor per trajectory


def batch_metrics(trajs):
    n = len(trajs)
    mean = lambda f: sum(f(t) for t in trajs) / n
    return dict(reward=mean(lambda t: t.reward["score"]), acc=mean(lambda t: t.reward["acc"]),
                format=mean(lambda t: t.reward["format"]), turns=mean(lambda t: t.turns),
                response_tokens=mean(lambda t: len(t.seq.ids) - t.prompt_len),
                code_calls=mean(lambda t: t.calls["code"]),
                search_calls=mean(lambda t: t.calls["search"]),
                image_search_calls=mean(lambda t: t.calls["image_search"]),
                judged=mean(lambda t: t.reward.get("judged", False)),   # the rest the rules decided
                infra_errors=sum(t.infra_errors for t in trajs))


# ======================================================================================= the reward
def format_ok(response, data_source):
    """The original's format rules on the decoded response (tool outputs included)."""
    # as the original: a response not starting with <think> gets one (whitespace first: two, 0)
    text = response if response.startswith("<think>") else "<think>" + response
    if text.count("<think>") != text.count("</think>") or text.count("<think>") == 0:
        return False
    if text.count("<code>") != text.count("</code>"):
        return False
    if data_source == "search" and text.count("<tool_call>") != text.count("</tool_call>"):
        return False
    tail = text.rsplit("</think>", 1)[1]
    if tail.count("<answer>") != tail.count("</answer>") or tail.count("<answer>") == 0:
        return False
    return bool(tools.extract_answer(text))   # an answer read ("</answer> x <answer>" has none)


def compute_reward(response, answer, data_source, question="", judge=None, judge_mode="all"):
    """0.8 * accuracy + 0.2 * format, as the original (reward_score/deepeyesv2.py). Perception and
    search answers of >= 300 characters get accuracy 0 and format 0 (no judge hacking; the
    original's math scorer has no such rule). A search-type trajectory that called a tool pays 10%
    of its accuracy term; the reported `acc` is not reduced."""
    pred = tools.extract_answer(response)
    fmt = float(format_ok(response, data_source))
    if data_source != "reason" and pred is not None and len(pred) >= 300:
        return dict(score=0.0, acc=0.0, format=0.0, judged=False)
    acc, judged = rule_score(pred, answer, question), False
    if judge is not None and pred and (judge_mode == "all" or not acc):   # the paper: every answer
        acc = judge.math(question, answer, normalize_final_answer(pred)) \
            if data_source == "reason" else judge.perception(question, answer, pred)
        judged = True
    cost = 0.9 if data_source == "search" and "<tool_call>" in response else 1.0
    return dict(score=0.8 * acc * cost + 0.2 * fmt, acc=acc, format=fmt, judged=judged)


# ============================================================================================= data
def load_prompts(path):
    """JSONL rows {images: [paths relative to the file], question, answer, data_source, id[,
    prompt]}; `prompt`, the chat messages a released row was trained with ("<image>" where its
    images go), is used as given. Every row is checked here (its images decoded once): a bad one is
    reported with its line, skipped and counted."""
    root = os.path.dirname(os.path.abspath(path))
    return reading.kept_rows(reading.jsonl_lines(path), lambda row, n: prompt_row(row, root, n),
                             path, "prompts")


def prompt_row(row, root, n):
    """One RL row -> Sample, or ValueError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    images, question, answer = row.get("images") or [], row.get("question"), row.get("answer")
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError("images must be a list of paths")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    M.refuse_special_text(question)
    if isinstance(answer, list) and answer and all(isinstance(a, (str, int, float))
                                                   for a in answer):
        answer = " or ".join(str(a) for a in answer)   # alternatives, as the rule scorer reads them
    if not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise ValueError("answer must be a string (or a list of alternatives)")
    if row.get("data_source", "reason") not in ("perception", "reason", "search"):
        raise ValueError("data_source must be perception, reason or search, not "
                         f"{row.get('data_source')!r}")
    prompt = row.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
            raise ValueError("prompt must be a list of chat messages with string contents")
        for m in prompt:
            M.refuse_special_text(m["content"], "prompt")
        holes = sum(m["content"].count("<image>") for m in prompt)
        if holes != len(images):
            raise ValueError(f"prompt has {holes} <image> placeholders for {len(images)} images")
    return R.Sample([M.load_image(os.path.join(root, p)) for p in images], question, str(answer),
                    row.get("data_source", "reason"), str(row.get("id", n)), prompt)


# ============================================================================================== CLI
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=M.DEFAULT_MODEL,
                    help="policy to start from: hub name or folder (the SFT one)")
    ap.add_argument("--data", help="RL prompts JSONL (images, question, answer, data_source)")
    ap.add_argument("--out", default="runs/grpo", help="checkpoint and metrics folder")
    ap.add_argument("--group", type=int, default=16, help="samples per prompt (GRPO group size)")
    ap.add_argument("--prompts", type=int, default=256, help="prompts per rollout batch")
    ap.add_argument("--mini-batch", type=int, default=32,
                    help="prompts per optimizer step (8 steps per batch)")
    ap.add_argument("--micro-batch", type=int, default=4,
                    help="trajectories per forward (memory, not math)")
    ap.add_argument("--epochs", type=float, default=32, help="passes over the prompts at most "
                    "(the launch script's 32)")
    ap.add_argument("--steps", type=int, default=60, help="rollout batches at most: where the "
                    "paper's RL curves end (~60); whichever of --epochs and --steps comes first")
    ap.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (constant)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    ap.add_argument("--clip-low", type=float, default=0.2, help="PPO ratio clip below 1")
    ap.add_argument("--clip-high", type=float, default=0.2, help="PPO ratio clip above 1")
    ap.add_argument("--dual-clip", type=float, default=3.0,
                    help="cap of the loss for negative advantages, x|A|")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the "
                    "rollouts; the update scores the same tempered policy (logits / temperature, "
                    "as the original's actor)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    ap.add_argument("--max-turns", type=int, default=9, help="model turns per trajectory")
    ap.add_argument("--max-turn-tokens", type=int, default=8192, help="tokens per model turn")
    ap.add_argument("--max-response-tokens", type=int, default=16384,
                    help="response budget, observations included")
    ap.add_argument("--max-pixels", type=int, default=M.RL_MAX_PIXELS,
                    help="pixel cap of input images")
    ap.add_argument("--search-url", default=None,
                    help="search backend (default $DEEPEYES_SEARCH_URL or local)")
    ap.add_argument("--prompt", default="agent", help="prompt for rows without their own: agent "
                    "(code + text and image search), code, direct (data/prompts/, the original's), "
                    "or a system prompt file")
    ap.add_argument("--image-search-cache", help="the released image-search cache JSON (keyed by "
                    "the row's id): image search answers from it, as the original's")
    ap.add_argument("--image-search-miss", choices=["end", "observe"], default="end",
                    help="an image search the cache has no entry for: end the episode (the "
                    "original's), or answer with an error observation")
    ap.add_argument("--val-data", help="validation prompts JSONL (the original: V*), scored "
                    "greedily every --val-every batches and the last into the metrics (val_acc)")
    ap.add_argument("--val-every", type=int, default=4, help="rollout batches between "
                    "validations (the launch script's 4)")
    ap.add_argument("--keep-best", action="store_true", help="with --val-data: also keep the "
                    "checkpoint of the best validation (of equals, the first) in OUT/best/")
    ap.add_argument("--judge-mode", choices=["all", "rules-first"], default="all", help="with a "
                    "judge: judge every answer (the paper), or only those the rules reject "
                    "(cheaper; the metrics say how many were judged)")
    ap.add_argument("--judge-url", default=os.environ.get("JUDGE_URL"), help="OpenAI-compatible "
                    "judge base URL (default $JUDGE_URL; none: the rules only)")
    ap.add_argument("--judge-model", default=os.environ.get("JUDGE_MODEL", "Qwen2.5-72B-Instruct"),
                    help="judge model")
    ap.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the token embeddings (and the tied output projection) fixed "
                    "(default: off; --tiny: on)")
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                    help="gradient checkpointing")
    ap.add_argument("--save-every", type=int, default=10, help="checkpoint every N rollout batches")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over in an --out that already holds a run")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--tiny", action="store_true", help="CPU preset: group 4, 8 prompts, "
                    "mini-batch 4, micro-batch 8, lr 2e-5, short turns, frozen embeddings")
    args = ap.parse_args(argv)
    if args.tiny:
        preset = dict(group=4, prompts=8, mini_batch=4, micro_batch=8, lr=2e-5, max_turn_tokens=96,
                      max_response_tokens=1024, max_turns=4, grad_ckpt=False, save_every=5,
                      freeze_embeddings=True)
        flags.apply_preset(ap, args, argv, preset)
    flags.check_args(ap, args, positive=("prompts", "mini_batch", "micro_batch", "epochs", "steps",
                                         "lr", "grad_clip", "max_turns", "max_turn_tokens",
                                         "max_response_tokens", "max_pixels", "save_every",
                                         "val_every", "temperature", "top_p", "dual_clip"),
                     fraction=("top_p", "weight_decay", "clip_low"),
                     at_most=dict(lr=1.0, epochs=1000))
    for flag in ("image_search_cache", "val_data"):
        if getattr(args, flag) and not os.path.isfile(getattr(args, flag)):
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such file")
    if args.keep_best and not args.val_data:
        ap.error("--keep-best needs --val-data: the checkpoint kept is the best validated")
    try:   # a missing prompt file is found now, not after the model has loaded
        R.load_prompt(args.prompt)
    except FileNotFoundError as e:
        ap.error(str(e))
    if args.group < 2:   # a group of one has no spread: its advantage would be 0 / 0
        ap.error(f"--group must be >= 2 (got {args.group}): GRPO compares a prompt's samples")
    return args


def main():
    args = parse_args()
    if not args.data or not os.path.isfile(args.data):
        sys.exit(f"error: RL data {args.data!r} not found: convert the released parquet with "
                 "`python -m support.convert rl FILES --out DIR`, or build the miniature world "
                 "with `python data/world.py`")
    train(args)


if __name__ == "__main__":
    main()
