"""data/world.py -- DeepEyesV2 in miniature: a seeded synthetic world where a tiny VLM can only succeed with tools.

Four RealX-style categories that need a tool for real, and one that does not:
  recognition   a 6-px coloured mark on a 448-px picture: invisible at the model's 112-px input, so code reads it
                (`getcolors()` on the full-resolution `image_1`), and the model names the printed colour
  reasoning     "How many red marks are in the picture?": 6-px marks, counted by code over the full-size pixels
  search        "Which animal is the emblem of Venpe?": a fact only the local corpus holds (held-out towns never
                appear in training, so nothing can be memorised)
  integration   a town's emblem: image search finds the town's name, then text search its animal
  glance        "What colour is the big square?": a 384-px square, plain at 112 px; a look answers it. The expert's
                cold start still runs an image search first on half the items (GLANCE_HABIT: strong models'
                trajectories often call a tool they do not need); RL then shows whether GRPO learns to skip it (the
                paper's tool calls per sample fell from ~1.45 to ~1.1 under RL). It is asked among the search data,
                so the one term of the original's reward that touches tool use applies: a search-type answer's
                accuracy is multiplied by 0.9 when the response holds a <tool_call> (no tool bonus, no other cost)
The local search corpus and image index (for `python -m support.search_server --min-image-score 0.95`) are generated
with the items.

Cold start and RL data differ, as in the paper (RL data is broader than the cold start): the expert's cold-start
items ask each category in one wording (COLD_QUESTION), while every RL prompt and every other held-out item uses
another (NEW_QUESTION: "Count the red dots."). That is where GRPO has something to learn: after SFT the model meets
a new wording with the wrong tool (asked for "the hue of the tiny dot" it runs a text search), and only the reward
tells it which tool a question needs (`--new-wording 0`: every question in the cold start's words).

Cold-start trajectories come from a scripted expert (as the authors used strong models): it runs the real tools,
and a trajectory is kept only when its answer is right and its code ran clean, written in sft.py's format.

Deliberate choices, so that a 3.8M-parameter model learns the world in minutes on a CPU: one question template per
category; answers from small closed sets (6 colours, counts 1-9, 8 animals); town, colour and animal names are
single tokens of the tiny tokenizer (build_tiny's `words`). A model that small cannot learn to copy a multi-token
span (an induction head) in minutes, so every value the model must carry from one place to another is one token.
The world uses its own short prompt set (world_system_prompt.txt / world_user_prompt.txt, passed as --prompt FILE):
the original's agent prompt is longer than a whole miniature trajectory.
What made it work (each measured, teacher-forced on held-out expert trajectories, see README):
  - a recall pre-training over every world word (`pretrain_recall`): the stand-in for a base model that knows its
    vocabulary and can copy a word it has read; without it no held-out town reaches a search query;
  - frozen token embeddings in the tiny SFT and GRPO (`--tiny`): trained, the ~250 training towns' embeddings move
    and copying of towns never trained on falls to 0% (frozen: 100% in search);
  - tiny embeddings initialised at 1/sqrt(hidden) (support.tiny.build_tiny): at 0.02 the tied output layer cannot make
    confident logits and GRPO's temperature-1 samples broke the protocol (format reward 3%);
  - image search returns only clear matches (IMAGE_MATCH): with the 3 nearest flags the model had to copy the first
    of three town names, and queried a town it had seen in training instead (integration 56% after SFT, 3 seeds).

Commands:
  python data/world.py                      # write data/world/ (seed 0): items, corpus, image index, SFT data
  python data/world.py --pipeline           # the whole miniature: world, tiny model, SFT, GRPO (and GRPO from the
                                            # base), eval tables, the three findings, RL curves (runs/mini/grpo)
"""
import argparse
import itertools
import json
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # the stages live one folder up
import tools  # noqa: E402
from support import optim, report, search_server, tiny as TINY  # noqa: E402

PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30),
           "purple": (140, 50, 170), "orange": (240, 130, 20)}
SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "tor", "sa", "bel", "dun", "mor", "ti", "zan", "pe", "gor", "li", "ash"]
ANIMALS = ["otter", "heron", "badger", "falcon", "lynx", "beaver", "raven", "wolf"]
CATEGORIES = ("recognition", "reasoning", "search", "integration", "glance")
SOURCE = {"recognition": "perception", "reasoning": "reason", "search": "search", "integration": "search",
          "glance": "search"}
COLD_QUESTION = {"recognition": "What colour is the small mark in the picture?",
                 "reasoning": "How many red marks are in the picture?",
                 "search": "Which animal is the emblem of {name}?",
                 "integration": "Which animal is the emblem of the town with this flag?",
                 "glance": "What colour is the big square in the picture?"}
# Other wordings, only in the RL and held-out splits: the cold start shows one wording a category, RL data is broader
NEW_QUESTION = {"recognition": "Name the hue of the tiny dot.",
                "reasoning": "Count the red dots.",
                "search": "{name}: which creature is on its crest?",
                "integration": "This flag's town has which creature on its crest?",
                "glance": "The large square: which colour is it?"}
# The miniature's own short prompts: each of their tokens is paid in every sequence of SFT, RL and eval (the full
# system prompt is 217 tiny-tokenizer tokens, more than a whole trajectory), and a 3.8M model does not read
# instructions: it learns the protocol from the cold start. Shortened from 92 to 41 tokens: ~20% less compute.
WORLD_PROMPT = "You are a visual agent: think, then run python, search, search by image, or answer."
WORLD_USER = "<image>{question}\nPut the final answer inside <answer> </answer>."
WORLD_MAX_PIXELS = 112 * 112   # the model sees 4 x 4 visual tokens per picture: small details are lost
IMAGE_MATCH = 0.95   # image search returns only flags this similar: one clear match, not the 3 nearest of anything
GLANCE_HABIT = 0.5   # the share (in quarters) of glance trajectories in the cold start with a needless search first
NEW_WORDING = 0.5    # the share of held-out questions in words the cold start never showed (RL prompts: all)


def name_capacity():
    """How many distinct town names of 2-3 syllables exist."""
    return len({"".join(p).capitalize() for k in (2, 3) for p in itertools.product(SYLLABLES, repeat=k)})


def entity_names(rng, n):
    if n > name_capacity():   # the loop below would never end
        raise ValueError(f"the world needs {n} town names but only {name_capacity()} exist: ask for fewer items")
    names = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize())
    return sorted(names)


def emblem(rng):
    """A 3 x 3 grid of palette colours: what the image index knows an entity by."""
    cells = [rng.choice(list(PALETTE.values())) for _ in range(9)]
    img = Image.new("RGB", (84, 84))
    for i, c in enumerate(cells):
        img.paste(c, (28 * (i % 3), 28 * (i // 3), 28 * (i % 3) + 28, 28 * (i // 3) + 28))
    return img


def photo_of(img, rng):
    """The emblem as a question shows it: bigger, shifted, on a light background. Image search matches it at cosine
    >= 0.97 while the closest other emblem stays <= 0.93 (measured on 300), so IMAGE_MATCH returns just the town."""
    out = Image.new("RGB", (224, 224), (235, 235, 230))
    out.paste(img.resize((216, 216), Image.NEAREST), (rng.randint(2, 6), rng.randint(2, 6)))
    return out


def marked_picture(rng, colour):
    background = tuple(rng.randint(150, 200) for _ in range(3))
    img = Image.new("RGB", (448, 448), background)
    x, y = rng.randint(0, 440), rng.randint(0, 440)
    img.paste(PALETTE[colour], (x, y, x + 6, y + 6))
    return img


def big_square_picture(rng, colour):
    """A 384-px square on a 448-px picture, placed anywhere it fits: at the model's 112 px it covers the middle
    2 x 2 of its 4 x 4 visual tokens whole and most of the others (at 288 px a look named the colour half as often)."""
    img = Image.new("RGB", (448, 448), tuple(rng.randint(150, 200) for _ in range(3)))
    x, y = rng.randint(0, 64), rng.randint(0, 64)
    img.paste(PALETTE[colour], (x, y, x + 384, y + 384))
    return img


def plain_picture(rng):
    return Image.new("RGB", (224, 224), tuple(rng.randint(120, 220) for _ in range(3)))


def counting_picture(rng, n):
    """n red 6-px marks and a few of other colours, apart from each other, on a 448-px picture."""
    img = Image.new("RGB", (448, 448), tuple(rng.randint(150, 200) for _ in range(3)))
    spots = rng.sample([(x, y) for x in range(8, 440, 24) for y in range(8, 440, 24)], n + 4)
    for k, (x, y) in enumerate(spots):
        img.paste(PALETTE["red" if k < n else rng.choice(["blue", "green", "yellow"])], (x, y, x + 6, y + 6))
    return img


def make_items(rng, split, n, entities, emblems, out, new_wording):
    """n items per category; images saved under out/images/. Each entity is used by at most one item.
    new_wording: the share of items asked in NEW_QUESTION's words, spread evenly (every other item at 0.5): each
    category gets the same number on every seed, so a seed's score does not depend on how many it drew."""
    items, pool = [], list(entities)
    rng.shuffle(pool)
    for cat in CATEGORIES:
        for i in range(n):
            item_id = f"{split}-{cat}-{i}"
            new = int((i + 1) * new_wording) > int(i * new_wording)
            asked = NEW_QUESTION if new else COLD_QUESTION
            if cat == "recognition":
                colour = rng.choice(sorted(PALETTE))
                img, q, answer = marked_picture(rng, colour), asked[cat], colour
            elif cat == "glance":
                colour = rng.choice(sorted(PALETTE))
                img, q, answer = big_square_picture(rng, colour), asked[cat], colour
            elif cat == "reasoning":
                n_marks = rng.randint(1, 9)
                img, q, answer = counting_picture(rng, n_marks), asked[cat], str(n_marks)
            else:
                name = pool.pop()
                answer = str(entities[name])
                if cat == "search":
                    img, q = plain_picture(rng), asked[cat].format(name=name)
                else:
                    img, q = photo_of(emblems[name], rng), asked[cat]
            path = f"images/{item_id}.png"
            img.save(os.path.join(out, path))
            items.append(dict(id=item_id, images=[path], question=q, answer=answer, data_source=SOURCE[cat],
                              category=cat, wording="new" if new else "cold-start"))
    return items


# ================================================================================================ the expert
COLOUR_CODE = "print(sorted(image_1.getcolors())[0][1])"   # the least common colour: the mark
COUNT_CODE = "import numpy as np\nprint((np.array(image_1) == (220, 40, 40)).all(-1).sum() // 36)"   # 6 x 6 px each


def expert_turns(item):
    """The scripted expert's plan: a list of turns; a callable turn is written after seeing the last observation."""
    cat = item["category"]
    if cat == "recognition":
        name_of = {str(v): k for k, v in PALETTE.items()}
        return [f"<think>The mark is too small to see. I will find its colour with code.</think><code>\n```python\n"
                f"{COLOUR_CODE}\n```\n</code>",
                lambda obs: "<think>I have the colour.</think>"
                            f"<answer>{name_of.get(obs_value(obs), 'unknown')}</answer>"]
    if cat == "reasoning":
        return ["<think>The marks are too small to count by eye. I will count the red pixels with code.</think><code>\n"
                f"```python\n{COUNT_CODE}\n```\n</code>",
                lambda obs: f"<think>I have the count.</think><answer>{obs_value(obs)}</answer>"]
    # the look is worded apart from recognition's think: when it read "The square is big: I can see its colour.",
    # RL's push to drop the needless search spread to recognition, which then answered by eye
    if cat == "glance":   # the expert sees the square; on half the items it still searches by the image first
        look = f"<think>Big and plain: no tool needed.</think><answer>{item['answer']}</answer>"
        if int(item["id"].rsplit("-", 1)[1]) % 4 >= 4 * GLANCE_HABIT:
            return [look]
        return ["<think>I will search by the image first.</think><tool_call>{\"name\": \"image_search\"}</tool_call>",
                lambda obs: look]
    search = lambda name: f'<think>I will search for the town.</think><tool_call>{{"name": "search", ' \
                          f'"arguments": {{"query": "{name}"}}}}</tool_call>'
    answer = lambda obs: f"<think>The result names the animal.</think><answer>{animal_in(obs)}</answer>"
    if cat == "search":
        return [search(item["question"].split(" of ")[1].rstrip("?")), answer]
    return ['<think>I do not know this flag. I will search by the image.</think>'
            '<tool_call>{"name": "image_search"}</tool_call>',
            lambda obs: search(obs.split("[", 1)[1].split("]", 1)[0]), answer]


def obs_value(obs):
    """The printed value of a code observation."""
    return obs.split("stdout:\n```\n", 1)[1].split("\n```", 1)[0].strip() if "stdout:\n```\n" in obs else ""


def animal_in(obs):
    words = [w.strip(".,") for w in obs.split()]
    return next((w for w in words if w in ANIMALS), "unknown")


def expert_trajectory(item, root, url, image_dir):
    """Run the expert with the real tools -> (messages, image paths) in sft.py's format, or None if it failed."""
    images = [Image.open(os.path.join(root, p)).convert("RGB") for p in item["images"]]
    messages = [{"role": "system", "content": WORLD_PROMPT},
                {"role": "user", "content": WORLD_USER.replace("<image>", "<image>" * len(images))
                 .replace("{question}", item["question"])}]
    paths, obs = list(item["images"]), ""
    with tools.Sandbox(images) as box:
        for turn in expert_turns(item):
            text = turn(obs) if callable(turn) else turn
            messages.append({"role": "assistant", "content": text})
            action = tools.parse_action(text)
            if action.kind == "answer":
                ok = action.arg == item["answer"]
                return (messages, paths) if ok else None
            if action.kind == "code":
                result = box.run(action.arg)
                if result["stderr"]:
                    return None   # kept only when the code runs clean
                obs, out_images = tools.format_code_result(result), result["images"]
            elif action.kind == "search":
                obs, out_images = tools.text_search(action.arg, url=url, cache=False)
            else:
                obs, out_images = tools.image_search(images[0], url=url, cache=False)
            for k, img in enumerate(out_images):
                path = f"{image_dir}/{item['id']}-{len(messages)}-{k}.png"
                img.save(os.path.join(root, path))
                paths.append(path)
            messages.append({"role": "user", "content": obs.replace(tools.IMAGE_SLOT, "<image>")})
    return None


# ================================================================================================ the world
def build(out=os.path.join(HERE, "world"), seed=0, n_sft=96, n_rl=12, n_heldout=25, new_wording=NEW_WORDING):
    """Write the world: items for SFT / RL / held-out, the corpus and image index, and the expert's SFT data.
    new_wording: the share of held-out questions in NEW_QUESTION's words; the SFT items: none; the RL prompts: all
    (none at 0)."""
    rng = random.Random(seed)
    for sub in ("images", "index", "sft_images"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    per_split = {"sft": n_sft, "rl": n_rl, "heldout": n_heldout}
    names = entity_names(rng, 2 * sum(per_split.values()) + 20)   # 20 distractors only the corpus knows
    entities = {name: rng.choice(ANIMALS) for name in names}
    emblems = {name: emblem(rng) for name in names}
    for name, text in (("world_system_prompt.txt", WORLD_PROMPT), ("world_user_prompt.txt", WORLD_USER)):
        with open(os.path.join(out, name), "w") as f:   # the prompt set the scripts take as --prompt FILE
            f.write(text)
    with open(os.path.join(out, "corpus.jsonl"), "w") as f:
        for name, animal in entities.items():
            f.write(json.dumps(dict(title=name, link=f"https://wiki.local/{name}",
                                    text=f"{name} is a small town. Its emblem animal is the {animal}.")) + "\n")
    with open(os.path.join(out, "image_index.jsonl"), "w") as f:
        for name, img in emblems.items():
            img.save(os.path.join(out, "index", f"{name}.png"))
            f.write(json.dumps(dict(title=name, image=f"index/{name}.png")) + "\n")
    # entities are split too: an entity asked about in training is never asked about in the held-out split
    order = list(names)
    rng.shuffle(order)
    cuts = {"sft": order[:2 * n_sft], "rl": order[2 * n_sft:2 * (n_sft + n_rl)],
            "heldout": order[2 * (n_sft + n_rl):2 * sum(per_split.values())]}
    # every RL prompt in the new words: with half in the cold start's, GRPO learned fewer new-word cells (held-out
    # new wording 44 -> 54 over five seeds; all new: 46 -> 66, MEASUREMENTS.md)
    shares = {"sft": 0.0, "rl": 1.0 if new_wording else 0.0, "heldout": new_wording}
    splits = {s: make_items(rng, s, n, {k: entities[k] for k in cuts[s]}, emblems, out, shares[s])
              for s, n in per_split.items()}
    for s, items in splits.items():
        with open(os.path.join(out, f"{'sft_items' if s == 'sft' else s}.jsonl"), "w") as f:
            f.writelines(json.dumps(it) + "\n" for it in items)
    url = search_server.start_server_thread(os.path.join(out, "corpus.jsonl"), os.path.join(out, "image_index.jsonl"),
                                    min_image_score=IMAGE_MATCH)
    kept = 0
    with open(os.path.join(out, "sft.jsonl"), "w") as f, ThreadPoolExecutor(4) as pool:   # mostly sandbox waits
        for traj in pool.map(lambda item: expert_trajectory(item, out, url, "sft_images"), splits["sft"]):
            if traj:   # in item order: the same file as one at a time
                f.write(json.dumps(dict(images=traj[1], messages=traj[0])) + "\n")
                kept += 1
    print(f"world in {out}: {sum(len(v) for v in splits.values())} items "
          f"({', '.join(f'{s} {len(v)}' for s, v in splits.items())}), {len(entities)} corpus entities, "
          f"{kept}/{len(splits['sft'])} expert trajectories kept")
    return out


def texts(out):
    """The world's text, the tiny tokenizer's whole corpus (not this repo's code: an edit to a .py file must not
    change the miniature's tokenizer, and so its results)."""
    return [open(os.path.join(out, name), encoding="utf-8").read() for name in
            ("corpus.jsonl", "sft.jsonl", "rl.jsonl", "heldout.jsonl")]


def words(out):
    """The world's names, single tokens of the tiny tokenizer."""
    with open(os.path.join(out, "corpus.jsonl")) as f:
        towns = [json.loads(line)["title"] for line in f]
    return towns + ANIMALS + sorted(PALETTE)


# ================================================================================================ the base model
def pretrain_recall(path, words, steps=500, seed=0):
    """Stand-in for pre-training: a synthetic recall task (5-40 random tokens in which one of `words` or a digit
    appears, then a separator, then that word). Qwen2.5-VL arrives knowing every word of its vocabulary and able to
    carry a word it has read into what it writes; a random tiny model has neither, and SFT cannot teach it for names
    it never shows (held-out towns). The task covers every world word alike (train and held-out towns, animals,
    colours, digits) and never shows a question, a tool, a fact or an answer tag. Loss falls from 6.9 to 0.02 in
    ~400 steps (measured; it sits near 7 for the first 150-250); without it the tiny model copies no held-out town
    into its search query (0%)."""
    import torch
    import model as M
    model, processor = M.load_model(path, device="cpu")
    tok, rng = processor.tokenizer, random.Random(seed)
    targets = [tok.convert_tokens_to_ids(w) for w in words] + [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    filler = sorted(set(range(20, len(tok))) - set(targets) - set(tok.get_added_vocab().values()))   # no tags
    sep = tok.encode(" ->", add_special_tokens=False)
    opt = optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(steps):
        seqs, length = [], rng.randint(5, 40)   # one length a batch: no padding (2/5 of the compute at mixed lengths)
        for _ in range(16):
            word = rng.choice(targets)
            ids = [rng.choice(filler) for _ in range(length)]
            ids.insert(rng.randrange(len(ids) + 1), word)
            seqs.append(M.Seq(ids + sep + [word], [0] * (len(ids) + len(sep) + 1)))
        logp = M.token_logprobs(model, seqs)
        last = torch.tensor([len(s.ids) - 2 for s in seqs])
        loss = -logp[torch.arange(len(seqs)), last].mean()   # only the recalled word is scored
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"\rpre-training the tiny base on recall: step {step + 1}/{steps} loss {loss.item():.3f}", end="",
              flush=True)
    print()
    model.save_pretrained(path)
    return path


# ================================================================================================ the pipeline
def pipeline(out=os.path.join(HERE, "world"), runs="runs/mini", seed=0, rl_steps=None, sft_epochs=None, rl_epochs=4,
             n_sft=96, n_rl=12, n_heldout=25, new_wording=NEW_WORDING, from_base=True):
    """World -> tiny model -> SFT -> GRPO -> eval on the held-out split; prints the tables, returns their rows.
    from_base: also GRPO straight from the base model with the same RL budget (the paper's case for a cold start)."""
    import time
    import eval as E
    import grpo as G
    import model as M
    import rollout as R
    import sft as S
    clock, since = {}, time.time()   # seconds per stage, printed with the table

    def lap(stage):   # the time since the last lap goes to `stage`; every evaluation adds to "evals"
        nonlocal since
        clock[stage] = clock.get(stage, 0.0) + time.time() - since
        since = time.time()

    build(out, seed, n_sft, n_rl, n_heldout, new_wording=new_wording)
    lap("world")
    base = TINY.build_tiny(os.path.join(runs, "base"), "mini", seed, corpus=texts(out), words=words(out))
    pretrain_recall(base, words(out), seed=seed)
    lap("base")
    url = search_server.start_server_thread(os.path.join(out, "corpus.jsonl"), os.path.join(out, "image_index.jsonl"),
                                    min_image_score=IMAGE_MATCH)
    items = E.load("toy", os.path.join(out, "heldout.jsonl"))
    px = ["--max-pixels", str(WORLD_MAX_PIXELS)]
    cfg = dict(max_turns=4, max_turn_tokens=96, max_response_tokens=1024, max_pixels=WORLD_MAX_PIXELS,
               search_url=url, prompt=R.load_prompt(os.path.join(out, "world_system_prompt.txt")))
    results = {}

    def evaluate(name, path, **kw):
        model, processor = M.load_model(path, device="cpu")
        # the whole split in one batch: the same answers as 50 a batch (seeds 0-4, 9, 10), ~4 s sooner a run
        rows = E.evaluate(model, processor, items, os.path.join(runs, "eval", name), batch=len(items),
                          **dict(cfg, **kw))
        results[name] = E.summarize(rows, name)
        results[name]["code_errors"] = code_error_share(rows)
        lap("evals")

    # 10 prompts a batch, 5 a mini-batch: 2 updates a batch (the original makes 8; at 5 the tiny model lost what SFT
    # taught, MEASUREMENTS.md). At the defaults (60 prompts, 4 passes: 24 batches) each quarter of the RL curve is one
    # pass over the same prompts in the same order (grpo.py shuffles once), so its first and last quarter compare the
    # same questions (at 2 passes of 120 prompts they held different ones: a rise could be the category mix).
    # 8 samples a prompt, not the preset's 4: twice the chances that a group holds the rare right tool, and on
    # the same SFT models the RL curves rose twice as much (MEASUREMENTS.md)
    # The sampled reward can rise while the greedy answers eval reads fall apart (seed 4 of a second machine: 78 ->
    # 59): every 2 batches the policy answers `probe` (the RL prompts) greedily, and the checkpoint of the best such
    # probe (of equals, the first) is the one evaluated. From the base every group is flat: no probe (None)
    def grpo(start, folder, probe):
        G.train(G.parse_args(["--tiny", "--model", start, "--data", os.path.join(out, "rl.jsonl"),
                              "--out", os.path.join(runs, folder), "--search-url", url, *px,
                              "--group", "8", "--prompts", "10", "--mini-batch", "5",
                              "--prompt", os.path.join(out, "world_system_prompt.txt"), "--epochs", str(rl_epochs)]
                             + (["--steps", str(rl_steps)] if rl_steps else [])
                             + (["--val-data", probe, "--val-every", "2", "--keep-best"] if probe else [])))

    for sub in ("sft", "grpo", "grpo-from-base", "eval"):   # a run starts from scratch: stale checkpoints would resume
        __import__("shutil").rmtree(os.path.join(runs, sub), ignore_errors=True)
    evaluate("untrained", base)
    S.train(S.parse_args(["--tiny", "--model", base, "--data", os.path.join(out, "sft.jsonl"),
                          "--out", os.path.join(runs, "sft"), *px]
                         + (["--epochs", str(sft_epochs)] if sft_epochs else [])))   # None: the preset's
    lap("SFT")
    sft_model = os.path.join(runs, "sft", "checkpoint")
    evaluate("SFT", sft_model)
    grpo(sft_model, "grpo", os.path.join(out, "rl.jsonl"))
    lap("GRPO")
    kept = os.path.join(runs, "grpo", "best", "checkpoint")
    evaluate("SFT+GRPO", kept)
    E.report(os.path.join(runs, "eval", "SFT+GRPO"), data_root=out)   # every held-out trajectory, in a browser
    report.plot(os.path.join(runs, "grpo", "metrics.jsonl"))                 # the RL curves
    results["SFT+GRPO"]["curve"] = quarters(os.path.join(runs, "grpo", "metrics.jsonl"))
    evaluate("SFT+GRPO, tools disabled", kept, tools_on=False)
    if from_base:
        grpo(base, "grpo-from-base", None)
        lap("GRPO from the base")
        evaluate("GRPO from the base", os.path.join(runs, "grpo-from-base", "checkpoint"))
    clock["evals"] = clock.pop("evals")   # listed last
    print(f"\nthe miniature, held-out split ({len(items)} items), {sum(clock.values()):.0f} s on this machine ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in clock.items()) + ")")
    print_tables(results)
    return results


def print_tables(results):
    """Accuracy by category and wording, tool calls by category, the three findings' verdicts, then one JSON line."""
    columns = CATEGORIES + ("cold-start wording", "new wording")
    group = lambda r, c, key: r["groups"].get(c, {}).get(key, 0.0)
    print(f"{'accuracy':26s} {'overall':>8s} " + " ".join(f"{c:>12s}" for c in columns) + f" {'tools/item':>11s}"
          f" {'code errors':>12s}")
    for name, r in results.items():
        cells = [f"{group(r, c, 'accuracy'):{max(12, len(c))}.1f}" for c in columns]
        print(f"{name:26s} {r['accuracy']:8.1f} " + " ".join(cells) + f" {r['tool_calls_per_item']:11.2f}"
              f" {r['code_errors']:11.0f}%")
    print(f"{'tool calls / item':26s} " + " ".join(f"{c:>12s}" for c in CATEGORIES))
    for name, r in results.items():
        print(f"{name:26s} " + " ".join(f"{group(r, c, 'tool_calls'):12.2f}" for c in CATEGORIES))
    sft, rl = results["SFT"], results["SFT+GRPO"]
    needed = [c for c in CATEGORIES if c != "glance"]
    print("finding 1, the cold start: " + (f"GRPO from the base {results['GRPO from the base']['accuracy']:.0f}% "
          f"({results['GRPO from the base']['tool_calls_per_item']:.2f} tool calls/item) vs SFT+GRPO "
          f"{rl['accuracy']:.0f}%" if "GRPO from the base" in results else "not run (--no-from-base)"))
    print(f"finding 2, selective tools: glance calls/item {group(sft, 'glance', 'tool_calls'):.2f} -> "
          f"{group(rl, 'glance', 'tool_calls'):.2f} (accuracy {group(sft, 'glance', 'accuracy'):.0f} -> "
          f"{group(rl, 'glance', 'accuracy'):.0f}); the tool-needing categories' accuracy "
          f"{sum(group(sft, c, 'accuracy') for c in needed) / len(needed):.1f} -> "
          f"{sum(group(rl, c, 'accuracy') for c in needed) / len(needed):.1f}")
    print(f"finding 3, what GRPO adds: new wording {group(sft, 'new wording', 'accuracy'):.1f} -> "
          f"{group(rl, 'new wording', 'accuracy'):.1f}, overall {sft['accuracy']:.1f} -> {rl['accuracy']:.1f}")
    if "curve" in rl:   # the rise the picture shows
        c = rl["curve"]
        print(f"the RL curve, first -> last quarter of its {c['batches']} batches: reward {c['reward'][0]:.3f} -> "
              f"{c['reward'][1]:.3f}, tool calls/sample {c['tool_calls'][0]:.2f} -> {c['tool_calls'][1]:.2f}")
        if c["probe"]:
            print(f"evaluated: the checkpoint of batch {c['probe']['kept_batch']}, the best greedy probe on the RL "
                  f"prompts ({c['probe']['first']:.3f} at the first probe, {c['probe']['kept']:.3f} there)")
    print(json.dumps({name: dict(accuracy=round(r["accuracy"], 1),
                                 new_wording=round(group(r, "new wording", "accuracy"), 1),
                                 tool_calls_per_item=round(r["tool_calls_per_item"], 2),
                                 code_errors=round(r["code_errors"], 1), curve=r.get("curve"),
                                 by_category={c: dict(accuracy=round(group(r, c, "accuracy"), 1),
                                                      tool_calls=round(group(r, c, "tool_calls"), 2))
                                              for c in CATEGORIES})
                      for name, r in results.items()}))


def quarters(metrics_path):
    """The RL run's reward and tool calls per sample, the mean of its first and of its last quarter of batches; the
    greedy probe's first value and the kept checkpoint's (with its batch)."""
    rows = [json.loads(line) for line in open(metrics_path)]
    ends = lambda f: tuple(round(m, 3) for m in report.quarter_means([f(r) for r in rows]))
    probes = [(r["val_acc"], -r["step"]) for r in rows if "val_acc" in r]   # --keep-best's pick: max, then first
    best = max(probes, default=None)
    return dict(batches=len(rows), reward=ends(lambda r: r["reward"]),
                tool_calls=ends(lambda r: r["code_calls"] + r["search_calls"] + r["image_search_calls"]),
                probe=best and dict(first=round(probes[0][0], 3), kept=round(best[0], 3), kept_batch=-best[1]))


def code_error_share(rows):
    """Percent of the code calls in these eval rows whose run wrote to stderr (a traceback: faulty code)."""
    runs = [m.group(1).strip() for r in rows for m in re.finditer(r"Code execution result:\nstdout:\n```\n.*?```"
                                                                    r"\n\nstderr:\n```\n(.*?)```", r["trajectory"],
                                                                    re.S)]
    return 100 * sum(bool(e) for e in runs) / len(runs) if runs else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "world"), help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--sft", type=int, default=96, help="SFT items per category")
    ap.add_argument("--rl", type=int, default=12, help="RL prompts per category")
    ap.add_argument("--heldout", type=int, default=25, help="held-out items per category")
    ap.add_argument("--pipeline", action="store_true", help="then train and evaluate the tiny model end to end")
    ap.add_argument("--runs", default="runs/mini", help="--pipeline: folder of its models and evaluations")
    ap.add_argument("--rl-steps", type=int, help="--pipeline: stop GRPO after this many rollout batches")
    ap.add_argument("--rl-epochs", type=float, default=4, help="--pipeline: GRPO passes over the RL prompts")
    ap.add_argument("--sft-epochs", type=float, help="--pipeline: SFT epochs (default: sft.py --tiny's, 6)")
    ap.add_argument("--from-base", action=argparse.BooleanOptionalAction, default=True, help="--pipeline: also "
                    "GRPO from the base model with no SFT, same RL budget, as a row (the paper's finding that the "
                    "cold start is needed; --no-from-base skips it)")
    ap.add_argument("--new-wording", type=float, default=NEW_WORDING,
                    help="share of held-out questions in words the cold start never shows (every RL prompt "
                    "is in them; 0: no question is)")
    args = ap.parse_args()
    if 2 * (args.sft + args.rl + args.heldout) + 20 > name_capacity():
        ap.error(f"--sft + --rl + --heldout = {args.sft + args.rl + args.heldout}: the world has town names for "
                 f"at most {(name_capacity() - 20) // 2} items per category in all")
    if args.pipeline:
        return pipeline(args.out, args.runs, args.seed, args.rl_steps, args.sft_epochs, args.rl_epochs, args.sft,
                        args.rl, args.heldout, args.new_wording, args.from_base)
    build(args.out, args.seed, args.sft, args.rl, args.heldout, new_wording=args.new_wording)


if __name__ == "__main__":
    main()
