"""support/bench.py -- speed and memory, each measured against the naive way in the same run.

  python -m support.bench sandbox                          # session start, warm call, 16 parallel sessions
  python -m support.bench rollout [--preset 7b --n 64 256 --skip-generate]   # tok/s: batched rollout vs
                                                           # model.generate one at a time; cache vs not
  python -m support.bench profile [--preset 7b --n 64]     # torch.profiler over one rollout: ops table, trace
  python -m support.bench sft --preset 7b                  # peak memory and tokens/s of 7B SFT steps (GPU)
  python -m support.bench grpo --preset 7b --micro-batch 1 # peak memory and time of a 7B GRPO step (GPU)

The 7b preset is the real Qwen2.5-VL-7B architecture with random bf16 weights (on the real Qwen vocabulary when
qwen-agent's qwen.tiktoken is at hand), so a GPU machine without a hub can measure it. The README's tables were
made with these commands.
"""
import argparse
import json
from collections import Counter
from contextlib import contextmanager
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

import grpo as G
import model as M
from support import optim
import sft as S
import tools
import rollout as R
from rollout import OBS_PREFIX, OBS_SUFFIX, Sample, encode, load_prompt, rollout, start
from support.fast_decode import STATS

PHASES = Counter()   # seconds per phase of a rollout, timed from outside its loop (`instrumented`)


@contextmanager
def timer(phase):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.record_function(phase):   # a labelled span in `profile`'s trace (free otherwise)
        yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    PHASES[phase] += time.perf_counter() - t0


@contextmanager
def instrumented(re_prefill=False, share=True, other_decode=False):
    """Time the rollout's prefill and decode by wrapping them for the run (the loop itself has no timers).
    re_prefill: drop every cache before each prefill (the naive way); share=False: prefill each sample;
    other_decode: the decode the device does not use by default (a GPU: the plain forward; a CPU: StaticKV, eager)."""
    real_prefill, real_decode, decoders = R.prefill, R.decode_turns, (R.StaticKV, R.PlainKV)

    def prefill(model, trajs):
        if re_prefill:
            for t in trajs:
                t.cache, t.cached, t.cached_images = None, 0, 0
        with timer("observation prefill" if any(t.turns for t in trajs) else "prompt prefill"):
            return real_prefill(model, trajs, share=share)

    def decode(*args):
        with timer("decode"):
            return real_decode(*args)
    R.prefill, R.decode_turns = prefill, decode
    if other_decode:
        R.StaticKV, R.PlainKV = decoders[1], decoders[0]
    try:
        yield
    finally:
        R.prefill, R.decode_turns = real_prefill, real_decode
        R.StaticKV, R.PlainKV = decoders


# ------------------------------------------------------------------------------------------- bench
SEVEN_B = dict(text_config=dict(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                num_key_value_heads=4, intermediate_size=18944, max_position_embeddings=128000,
                                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
               vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                  out_hidden_size=3584,
                                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                                  fullatt_block_indexes=[7, 15, 23, 31]))


def bench_model(preset, device):
    """(model, processor): a tiny preset built locally, or the real 7B architecture with random bf16 weights (on the
    real Qwen vocabulary when qwen-agent's qwen.tiktoken is at hand, so that the prompt has its real length)."""
    import importlib.util
    import tempfile
    from support.tiny import build_tiny, load_model, qwen_tokenizer
    real = preset == "7b" and importlib.util.find_spec("qwen_agent") is not None
    name = {"7b": "qwen" if real else "test"}.get(preset, preset)
    path = build_tiny(os.path.join(tempfile.gettempdir(), f"deepeyes_bench_{name}"),
                      "test" if preset == "7b" else preset, tokenizer=qwen_tokenizer() if real else None)
    model, processor = load_model(path, device=device)
    if preset == "7b":
        from transformers import Qwen2_5_VLConfig
        cfg = Qwen2_5_VLConfig(**SEVEN_B, image_token_id=model.config.image_token_id,
                               video_token_id=model.config.video_token_id)
        cfg.text_config.eos_token_id = cfg.text_config.pad_token_id = model.config.text_config.eos_token_id
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
        torch.set_default_dtype(torch.float32)
        model.eval()
    return model, processor


PEAK_TBS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}   # HBM bandwidth, TB/s: the decode step's ceiling


def decode_bytes(model):
    """-> (bytes of weights one decode step reads, bytes of K and V per cached token)."""
    lm = model.model.language_model
    weights = sum(p.numel() * p.element_size() for m in (lm.layers, lm.norm, model.lm_head) for p in m.parameters())
    a = lm.layers[0].self_attn
    per_token = len(lm.layers) * 2 * a.config.num_key_value_heads * a.head_dim * a.o_proj.weight.element_size()
    return weights, per_token


def scripted_work(tok, n, turns, turn_tokens):
    """-> (script, samples): n distinct prompts (a 224 px image each), `turns` scripted turns of `turn_tokens` tokens
    (code calls, then an answer)."""
    filler = tok.encode(" the red mark is small" * 40, add_special_tokens=False)
    code = tok.encode("<code>\n```python\nprint(1)\n```\n</code>", add_special_tokens=False)
    turn = tok.decode(filler[:turn_tokens - len(code)] + code)
    answer = tok.decode(filler[:turn_tokens - 8]) + "<answer>1</answer><|im_end|>"
    samples = [Sample([Image.new("RGB", (224, 224), (i % 256, i // 256, 0))], f"Question {i}?") for i in range(n)]
    return (lambda t, i: turn if i < turns - 1 else answer), samples


def profile_rollout(preset, n, turns, turn_tokens, out):
    """torch.profiler over one rollout of n rows, after a warm-up (graphs captured, allocator grown): the ops by total
    time, the prefill / decode / tool spans labelled, and a Chrome trace (chrome://tracing or ui.perfetto.dev) --
    where a decode step and a turn spend their time, to remove the largest costs first."""
    from torch.profiler import ProfilerActivity, profile
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = bench_model(preset, device)
    script, samples = scripted_work(processor.tokenizer, n, turns, turn_tokens)
    with instrumented():
        rollout(model, processor, samples, script=script)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    PHASES.clear()
    with profile(activities=acts) as prof, instrumented():
        rollout(model, processor, samples, script=script)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30))
    print("phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in PHASES.items()))
    prof.export_chrome_trace(out)
    print(f"wrote {out}")
    return prof


def bench_rollout(preset="mini", sizes=(16,), turns=4, turn_tokens=48, device=None, skip_generate=False, group=4):
    """Same scripted work several ways: our rollout at each batch size (CUDA graphs on a GPU); at the first size
    also re-prefill instead of cross-turn caches, GRPO-like groups (`group` samples a prompt) with the prompt
    prefilled once or per sample, and `model.generate` one trajectory and one turn at a time (the naive way)."""
    from model import token_logprobs
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = bench_model(preset, device)
    script, samples = scripted_work(processor.tokenizer, max(sizes), turns, turn_tokens)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else ""
    peak = next((v for k, v in PEAK_TBS.items() if k in gpu), None)
    weights, per_token = decode_bytes(model)
    rows, first = {}, None
    for n in sizes:
        modes = [(f"{n} rows (default)", samples[:n], 1, {})]
        if n == sizes[0]:
            other = "the plain forward" if device.startswith("cuda") else "StaticKV, eager"
            modes += [(f"{n} rows, decode by {other}", samples[:n], 1, dict(other_decode=True)),
                      (f"{n} rows, re-prefill each turn", samples[:n], 1, dict(re_prefill=True)),
                      (f"{n // group} x {group}, prompt prefilled once", samples[:n // group], group, {}),
                      (f"{n // group} x {group}, prefilled per sample", samples[:n // group], group,
                       dict(share=False))]
        for _, batch, k, kw in modes:   # warm-up at full size: the allocator's first big blocks are not measured
            with instrumented(**kw):
                rollout(model, processor, batch, n=k, script=script)
        for name, batch, k, kw in modes:
            sync(); t0 = time.perf_counter(); PHASES.clear(); STATS.clear()
            with instrumented(**kw):
                trajs = rollout(model, processor, batch, n=k, script=script)
            sync(); dt = time.perf_counter() - t0
            first = first or trajs
            gen = sum(sum(t.action_mask) for t in trajs)
            # StaticKV counts its steps (capture: once a bucket); the plain decode does not: no step time
            step = (PHASES["decode"] - STATS["capture_s"]) / STATS["steps"] if STATS["steps"] else float("nan")
            moved = weights * STATS["steps"] + per_token * STATS["kv_tokens"]
            ceiling = moved / (step * STATS["steps"]) / (peak * 1e12) if peak else float("nan")
            rows[name] = dict(tok_s=gen / dt, s=dt, prompt=PHASES["prompt prefill"],
                              prefill=PHASES["prompt prefill"] + PHASES["observation prefill"], decode=PHASES["decode"],
                              step_ms=1e3 * step, ceiling=ceiling)
            print(f"{name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in PHASES.items()), flush=True)
    if not skip_generate:
        sync(); t0 = time.perf_counter()
        gen = generate_one_at_a_time(model, processor, samples[:sizes[0]], script, turns)
        sync(); dt = time.perf_counter() - t0
        rows["model.generate, one at a time"] = dict(tok_s=gen / dt, s=dt, prompt=float("nan"), prefill=float("nan"),
                                                     decode=float("nan"), step_ms=float("nan"), ceiling=float("nan"))
    with torch.no_grad():   # the sampler's log-probs against the training forward's, on the first size's trajectories
        drift = max((lp[:len(t.seq.ids) - 1] - torch.tensor(t.logprobs[1:], device=lp.device)).abs()
                    [torch.tensor(t.action_mask[1:], dtype=torch.bool, device=lp.device)].max().item()
                    for i in range(0, len(first), 8) for t, lp in zip(first[i:i + 8], token_logprobs(
                        model, [t.seq for t in first[i:i + 8]]).float()))
    base = rows.get("model.generate, one at a time", rows[f"{sizes[0]} rows, re-prefill each turn"])["tok_s"]
    print(f"{preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {turns} turns x {turn_tokens} "
          f"tokens a trajectory, {gpu or device}, torch {torch.__version__}, prompt {first[0].prompt_len} tokens")
    print(f"{'way':40s} {'gen tok/s':>10s} {'seconds':>8s} {'prompt s':>9s} {'prefill s':>10s} {'decode s':>9s} "
          f"{'step ms':>8s} {'of peak BW':>10s} {'vs naive':>9s}")
    for name, r in rows.items():
        print(f"{name:40s} {r['tok_s']:10.1f} {r['s']:8.2f} {r['prompt']:9.2f} {r['prefill']:10.2f} {r['decode']:9.2f} "
              f"{r['step_ms']:8.2f} {r['ceiling']:10.2f} {r['tok_s'] / base:8.1f}x")
    print(f"largest |sampler log-prob - training forward's| over the {sizes[0]} rows: {drift:.2e}")
    n, g = sizes[0], group
    shared, separate = rows[f"{n // g} x {g}, prompt prefilled once"], rows[f"{n // g} x {g}, prefilled per sample"]
    print(json.dumps({"preset": preset, "device": gpu or device, "sampler_vs_trainer_logp": float(f"{drift:.2e}"),
                      **{f"rollout_{n}_tok_s": round(rows[f"{n} rows (default)"]["tok_s"], 1) for n in sizes},
                      "group_prompt_prefill_speedup": round(separate["prompt"] / max(shared["prompt"], 1e-9), 2),
                      **({"generate_tok_s": round(rows["model.generate, one at a time"]["tok_s"], 1)}
                         if not skip_generate else {})}))


def generate_one_at_a_time(model, processor, samples, script, turns):
    """The naive baseline: HF generate per trajectory per turn, re-encoding the conversation each time."""
    gen = 0
    for s in samples:
        t = start(processor, s, load_prompt("agent"))
        with tools.Sandbox(s.images) as box:
            for i in range(turns):
                ids = processor.tokenizer.encode(script(t, i), add_special_tokens=False)
                batch = dict(input_ids=torch.tensor([t.seq.ids]),
                             attention_mask=torch.ones(1, len(t.seq.ids), dtype=torch.long),
                             mm_token_type_ids=torch.tensor([t.seq.mm]), pixel_values=torch.cat(t.seq.pixels),
                             image_grid_thw=torch.tensor(t.seq.grids))
                dev = next(model.parameters()).device
                model.generate(**{k: v.to(dev) for k, v in batch.items()}, max_new_tokens=len(ids),
                               min_new_tokens=len(ids), do_sample=True)
                gen += len(ids)
                t.seq.ids += ids; t.seq.mm += [0] * len(ids)
                if i < turns - 1:
                    result = box.run("print(1)")
                    t.seq.extend(encode(processor, OBS_PREFIX + tools.format_code_result(result) + OBS_SUFFIX))
    return gen


def bench_sandbox(n_parallel=16, repeats=20):
    """Session start, warm calls and parallel sessions, each against a fresh `python -c` per call, same run."""
    from concurrent.futures import ThreadPoolExecutor
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8))
    crop = "plt.imshow(image_1.crop((100, 100, 400, 400)).resize((600, 600))); plt.axis('off'); plt.show()"
    tools.Sandbox([img]).close()   # start the zygote (once per process, not per session)
    med = lambda f: sorted(f() for _ in range(repeats))[repeats // 2]

    def timed(fn):
        t = time.perf_counter(); fn(); return time.perf_counter() - t

    def fresh(code):   # the naive way: a new interpreter per call that loads the image from disk
        path = os.path.join(tempfile.gettempdir(), "deepeyes_bench.png")
        if not os.path.exists(path):
            img.save(path)
        pre = (f"from PIL import Image; import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; "
               f"image_1 = Image.open('{path}'); ")
        code = code.replace("plt.show()", "plt.savefig('/dev/null', format='png', bbox_inches='tight')")
        subprocess.run([sys.executable, "-c", pre + code],
                       check=True, stdout=subprocess.DEVNULL)

    sb = tools.Sandbox([img])
    rows = [("session start (fork + lock-down + image)", med(lambda: timed(lambda: tools.Sandbox([img]).close())),
             med(lambda: timed(lambda: fresh("pass")))),
            ("warm call: print", med(lambda: timed(lambda: sb.run("print(1)"))),
             med(lambda: timed(lambda: fresh("print(1)")))),
            ("warm call: crop + show 1024px", med(lambda: timed(lambda: sb.run(crop))),
             med(lambda: timed(lambda: fresh(crop))))]
    sb.close()

    def session(_):
        with tools.Sandbox([img]) as s:
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


def bench_sft(preset, lengths, device=None):
    """Peak memory and tokens/s of optimizer steps (accum x batch-1 samples of `length` tokens with one image),
    with this file's settings: vision frozen, gradient checkpointing, stochastic-rounding AdamW."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = bench_model(preset, device)
    S.freeze_vision(model)
    M.set_gradient_checkpointing(model)
    model.train()
    opt = optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sched = S.cosine_with_warmup(opt, 100, 10)
    rows = []
    for length in lengths:
        msgs = [{"role": "user", "content": "<image>Describe it."},
                {"role": "assistant", "content": "<think>" + " the red mark is small" * (length // 5) + "</think>"}]
        seq, labels = S.encode_conversation(processor, msgs, [Image.new("RGB", (448, 448), "red")])
        seq.ids, seq.mm, labels = seq.ids[:length], seq.mm[:length], labels[:length]
        rows.append(dict(tokens=len(seq.ids), **measure_step(
            lambda: S.sft_step(model, opt, sched, [(seq, labels)] * 4, 1.0), opt, device, 4 * len(seq.ids))))
    n = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"SFT step, {preset} ({n:.2f}B params, vision frozen, grad ckpt, batch 1 x accum 4), {device}")
    print(f"{'tokens':>8s} {'step s':>8s} {'tok/s':>8s} {'peak GiB':>9s}")
    for r in rows:
        print(f"{r['tokens']:8d} {str(r['step_s']):>8s} {r['tokens_per_s']:8d} {str(r['peak_gib']):>9s}")
    print(json.dumps(dict(bench="sft", preset=preset, device=device, rows=rows)))


def bench_grpo(preset, lengths, micro, device=None):
    """Peak memory and time of one GRPO optimizer step (old log-probs + clipped loss over 2 micro-batches) on
    synthetic trajectories of each length: half the response tokens are the model's, half observations."""
    from PIL import Image
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = bench_model(preset, device)
    M.set_gradient_checkpointing(model)
    model.train()
    opt = optim.AdamW(model.parameters(), lr=1e-6)
    args = G.parse_args(["--mini-batch", "1", "--group", str(2 * micro), "--micro-batch", str(micro)])
    rows = []
    for length in lengths:
        t = start(processor, Sample([Image.new("RGB", (448, 448), "red")], "What is small?"), load_prompt("agent"))
        n = length - len(t.seq.ids)
        if n < 0:
            sys.exit(f"error: --tokens {length} is shorter than the prompt ({len(t.seq.ids)} tokens)")
        t.seq.ids += [processor.tokenizer.encode(" mark")[0]] * n
        t.seq.mm += [0] * n
        t.action_mask += [1, 0] * (n // 2) + [1] * (n % 2)
        trajs = [t] * (2 * micro)
        adv = torch.tensor([1.0, -1.0] * micro)
        rows.append(dict(tokens=length, micro_batch=micro, trajectories=len(trajs), **measure_step(
            lambda: G.grpo_update(model, opt, trajs, adv, args), opt, device, len(trajs) * length)))
    print(f"GRPO optimizer step, {preset}, full fine-tune, grad ckpt, {device}")
    print(f"{'tokens':>8s} {'micro':>6s} {'trajs':>6s} {'step s':>8s} {'tok/s':>8s} {'peak GiB':>9s}")
    for r in rows:
        print(f"{r['tokens']:8d} {r['micro_batch']:6d} {r['trajectories']:6d} {str(r['step_s']):>8s} "
              f"{r['tokens_per_s']:8d} {str(r['peak_gib']):>9s}")
    print(json.dumps(dict(bench="grpo", preset=preset, device=device, rows=rows)))


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sandbox", "rollout", "profile", "sft", "grpo"], help="what to measure (profile: "
                    "torch.profiler over one rollout, a table and a Chrome trace)")
    ap.add_argument("--preset", default=None, choices=["test", "mini", "7b"], help="model: tiny presets or the "
                    "real 7B architecture with random weights (GPU); default mini (rollout), 7b (sft, grpo)")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="rollout: trajectories in the batch, one or more "
                    "sizes (default 16 on CPU presets, 64 256 for 7b)")
    ap.add_argument("--group", type=int, default=None, help="rollout: samples a prompt in the group rows (default 4 "
                    "on CPU presets, 16 for 7b: the paper's group)")
    ap.add_argument("--turns", type=int, default=4, help="rollout: model turns a trajectory (3 code calls, an answer)")
    ap.add_argument("--turn-tokens", type=int, default=48, help="rollout: tokens generated per turn")
    ap.add_argument("--skip-generate", action="store_true", help="rollout: skip the slow model.generate baseline")
    ap.add_argument("--tokens", default=None, help="sft / grpo: sample or trajectory lengths, comma separated "
                    "(default 4096,20480 for sft, 4096,16384 for grpo)")
    ap.add_argument("--micro-batch", type=int, default=1, help="grpo: trajectories per forward")
    ap.add_argument("--trace", default="rollout_trace.json", help="profile: where the Chrome trace goes")
    args = ap.parse_args()
    if args.what == "sandbox":
        return bench_sandbox()
    if args.what == "rollout":
        preset = args.preset or "mini"
        big = preset == "7b"
        return bench_rollout(preset, args.n or ([64, 256] if big else [16]), args.turns, args.turn_tokens,
                             skip_generate=args.skip_generate, group=args.group or (16 if big else 4))
    if args.what == "profile":
        return profile_rollout(args.preset or "mini", (args.n or [64 if args.preset == "7b" else 16])[0], args.turns,
                               args.turn_tokens, args.trace)
    lengths = [int(x) for x in (args.tokens or ("4096,20480" if args.what == "sft" else "4096,16384")).split(",")]
    if args.what == "sft":
        return bench_sft(args.preset or "7b", lengths)
    return bench_grpo(args.preset or "7b", lengths, args.micro_batch)


if __name__ == "__main__":
    main()
