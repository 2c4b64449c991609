"""test_all.py -- CPU-only tests, each named after the property it pins. Run: python -m pytest -q test_all.py"""
import json
import os
import time

import pytest
import torch
from PIL import Image

import eval as E
import model as M
import sft as S
import tools as T

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.jsonl")


# ================================================================================================ fixtures
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    path = M.build_tiny(str(tmp_path_factory.mktemp("tiny")), "test", seed=0)
    model, processor = M.load_model(path, device="cpu")
    return model, processor, path


@pytest.fixture(scope="session")
def search_url(tmp_path_factory):
    return T.start_server_thread(CORPUS, image_index(tmp_path_factory.mktemp("search")))


def image_index(root):
    """Three flat colours, each with a white patch in its own place: an image index for the search tests."""
    rows = []
    for i, (name, colour) in enumerate([("Red Square", (220, 20, 20)), ("Green Park", (20, 200, 40)),
                                        ("Blue Lagoon", (20, 40, 220))]):
        img = Image.new("RGB", (48, 48), colour)
        img.paste((255, 255, 255), (8 * i, 8, 8 * i + 12, 20))
        img.save(root / f"{i}.png")
        rows.append({"title": name, "image": f"{i}.png"})
    (root / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "images.jsonl")


# ================================================================================================ model.py
def test_prepare_image_follows_spec_rules():
    wide = M.prepare_image(Image.new("RGB", (30000, 100)))            # ratio 300 -> squeezed below 200
    assert max(wide.size) / min(wide.size) < 200 and wide.size[0] % 28 == 0 and wide.size[1] % 28 == 0
    small = M.prepare_image(Image.new("RGB", (10, 50)))                 # short side < 32 -> upscaled
    assert min(small.size) >= 28 and small.size[1] > small.size[0]
    big = M.prepare_image(Image.new("RGB", (4000, 3000)), max_pixels=M.SFT_MAX_PIXELS)
    assert big.size[0] * big.size[1] <= M.SFT_MAX_PIXELS and big.size[0] % 28 == 0
    assert M.prepare_image(Image.new("RGB", (280, 140))).size == (280, 140)   # already fine: untouched


def test_encode_equals_processor_on_chat_template(tiny):
    _, processor, _ = tiny
    msgs = [{"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What <think> is x?"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    img = Image.new("RGB", (100, 60), "blue")
    ref = processor(text=[text], images=[M.prepare_image(img)], return_tensors="pt")
    seq = M.encode(processor, text, [img])
    assert seq.ids == ref["input_ids"][0].tolist()
    assert seq.mm == ref["mm_token_type_ids"][0].tolist()
    assert torch.equal(torch.cat(seq.pixels), ref["pixel_values"])


def test_tiny_model_is_deterministic_and_reloads_identically(tiny, tmp_path):
    model, processor, path = tiny
    again, _ = M.load_model(M.build_tiny(str(tmp_path / "again"), "test", seed=0), device="cpu")
    seq = M.encode(processor, f"<|im_start|>user\n{M.IMAGE_PLACEHOLDER}hi<|im_end|>\n", [Image.new("RGB", (56, 56))])
    assert torch.equal(M.token_logprobs(model, [seq]), M.token_logprobs(again, [seq]))
    other, _ = M.load_model(M.build_tiny(str(tmp_path / "other"), "test", seed=1), device="cpu")
    assert not torch.allclose(M.token_logprobs(model, [seq]), M.token_logprobs(other, [seq]))


def test_token_logprobs_are_independent_of_batch_padding(tiny):
    model, processor, _ = tiny
    a = M.encode(processor, f"<|im_start|>user\n{M.IMAGE_PLACEHOLDER}a long question here<|im_end|>\n",
                 [Image.new("RGB", (84, 56), "red")])
    b = M.encode(processor, "<|im_start|>user\nshort<|im_end|>\n")
    both = M.token_logprobs(model, [a, b])
    assert torch.allclose(both[0, :len(a.ids) - 1], M.token_logprobs(model, [a])[0], atol=1e-5)
    assert torch.allclose(both[1, :len(b.ids) - 1], M.token_logprobs(model, [b])[0], atol=1e-5)
    assert torch.all(both[1, len(b.ids) - 1:] == 0)


def test_missing_weights_give_one_clear_line():
    with pytest.raises(SystemExit) as e:
        M.load_model("/nonexistent/DeepEyesV2_7B")
    msg = str(e.value)
    assert "cannot load model" in msg and "--model" in msg and "\n" not in msg


# ================================================================================================ sandbox
def test_sandbox_is_a_notebook_with_preloaded_images():
    img = Image.new("RGB", (64, 48), "red")
    with T.Sandbox([img, Image.new("L", (10, 10))]) as sb:
        assert sb.run("print(image_1.size, image_2.mode)")["stdout"] == "(64, 48) L\n"
        sb.run("x = 41")
        assert sb.run("x + 1")["stdout"] == "42\n"                     # state persists; last expression shown
        r = sb.run("image_1.crop((0, 0, 10, 10)).show()")
        assert [im.size for im in r["images"]] == [(10, 10)] and r["images"][0].getpixel((0, 0)) == (255, 0, 0)
        r = sb.run("import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()\nplt.figure(); plt.show()")
        assert len(r["images"]) == 2
        r = sb.run("for i in range(12): display(image_1)")
        assert len(r["images"]) == 10 and "2 images dropped" in r["stderr"]


def test_sandbox_reports_syntax_errors_without_running():
    with T.Sandbox() as sb:
        r = sb.run("print('ran')\ndef f(:")
        assert r["stdout"] == "" and "SyntaxError" in r["stderr"]


HOSTILE = {
    "socket to loopback": ("import socket; socket.create_connection(('127.0.0.1', 8765), timeout=2)", "PermissionError"),
    "socket to a public address": ("import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)",
                                   "PermissionError"),
    "write outside scratch": ("open('/tmp/deepeyes_escape', 'w').write('x')", "Read-only file system"),
    "fork bomb": ("import os\nwhile True: os.fork()", "PermissionError"),
    "subprocess": ("import subprocess; subprocess.run(['true'])", "PermissionError"),
    "kill its parent": ("import os; os.kill(os.getppid(), 9)", "PermissionError"),
    "kill everything": ("import os; os.kill(-1, 9)", "PermissionError"),
    "memory bomb": ("x = bytearray(64 << 30)", "MemoryError"),
    "infinite loop": ("while True: pass", "TimeoutError"),
    "read host environ via /proc": ("print(open('/proc/1/environ').read())", "No such file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_code_is_contained(case):
    code, expected = HOSTILE[case]
    host_pid = os.getpid()
    with T.Sandbox(timeout=2) as sb:
        r = sb.run(code)
        assert expected in r["stderr"], r
        assert sb.run("print('still alive')")["stdout"] == "still alive\n"   # the session survives
    assert os.getpid() == host_pid and not os.path.exists("/tmp/deepeyes_escape")


def test_sandbox_starts_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("DEEPEYES_TEST_SECRET", "hunter2")
    with T.Sandbox() as sb:
        r = sb.run("import os; print(sorted(os.environ).count('DEEPEYES_TEST_SECRET'), 'hunter2' in str(os.environ))")
        assert r["stdout"] == "0 False\n"


def test_sandbox_writes_only_in_its_scratch_and_cleans_it():
    with T.Sandbox() as sb:
        scratch = sb.scratch
        assert sb.run("open('out.txt', 'w').write('hi'); print(open('out.txt').read())")["stdout"] == "hi\n"
        r = sb.run("open('big.bin', 'wb').write(b'0' * (200 << 20))")        # over the 64 MB scratch cap
        assert "Error" in r["stderr"]
    assert not os.path.exists(scratch)


def test_sandbox_bounds_printed_output():
    with T.Sandbox() as sb:
        r = sb.run("print('a' * 100_000_000)")
        assert len(r["stdout"]) < 2 * T.OUTPUT_LIMIT and "more characters truncated" in r["stdout"]


def test_hard_timeout_restarts_the_session_and_says_so():
    with T.Sandbox([Image.new("RGB", (8, 8))], timeout=1) as sb:
        sb.run("x = 1")
        t = time.time()
        r = sb.run("import signal; signal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True: pass")
        assert time.time() - t < 15 and "restarted" in r["stderr"] and sb.restarts == 1
        assert "NameError" in sb.run("x")["stderr"]                           # variables lost, as said
        assert sb.run("print(image_1.size)")["stdout"] == "(8, 8)\n"          # images loaded again


def test_sixteen_sessions_run_at_once_and_close_kills_them():
    from concurrent.futures import ThreadPoolExecutor
    boxes = [T.Sandbox([Image.new("RGB", (32, 32), (i, 0, 0))]) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda sb: sb.run("print(image_1.getpixel((0, 0))[0])")["stdout"], boxes))
    assert outs == [f"{i}\n" for i in range(16)]                              # each has its own image_1
    pids = [sb.pid for sb in boxes]
    for sb in boxes:
        sb.close()
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ================================================================================================ search
def test_text_search_formats_results_as_spec(search_url):
    text, images = T.text_search("Grace Hopper compiler launched", k=2, url=search_url, cache=False)
    assert images == []
    assert text.startswith("<tool_response>\nA Google search for 'Grace Hopper compiler launched' found 2 results:\n\n"
                           "## Web Results\n1. [Grace Hopper](https://en.wikipedia.org/wiki/Grace_Hopper)\n\n"
                           "Grace Hopper was an American")
    assert text.endswith("\n</tool_response>") and "\n\n2. [" in text


def test_image_search_finds_the_nearest_image(search_url):
    query = Image.new("RGB", (100, 100), (30, 190, 50))
    text, images = T.image_search(query, k=2, url=search_url, cache=False)
    assert "found 2 results" in text and f"1. {M.IMAGE_PLACEHOLDER}\n[Green Park] \n" in text and len(images) == 2


def test_image_search_min_score_keeps_only_clear_matches(tmp_path):
    index = image_index(tmp_path)
    query = Image.open(tmp_path / "1.png").resize((96, 96))
    nearest = T.SearchIndex(CORPUS, index).image(query, 3)
    strict = T.SearchIndex(CORPUS, index, min_image_score=0.95).image(query, 3)
    assert len(nearest) == 3 and [r["title"] for r in strict] == ["Green Park"]


def test_search_cache_serves_repeats_and_dead_backend_raises(search_url, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "CACHE_DIR", str(tmp_path))
    first = T.text_search("Eiffel Tower", url=search_url)
    dead = "http://127.0.0.1:9"   # nothing listens on the discard port
    monkeypatch.setattr(T, "SEARCH_URL", dead)
    with pytest.raises(T.SearchError):
        T.text_search("Eiffel Tower", url=dead)
    cached = T._cached("text", f"{search_url}|5|Eiffel Tower".encode(), lambda: pytest.fail("not cached"))
    assert cached and "Eiffel" in first[0]


# ================================================================================================ actions
@pytest.mark.parametrize("turn,kind,arg", [
    ("<think>x</think><answer>A</answer><code>```python\nprint(1)\n```</code>", "answer", "A"),
    ("<answer>1</answer> then <answer> 2 </answer>", "answer", "2"),
    ("<code>```python\nprint(1)\n```\n```python\nprint(2)\n```</code>", "code", "print(2)\n"),
    ("<code>print(1)</code>", "error", "Error: no ```python block"),
    ('<tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>', "search", "q"),
    ("<tool_call>{bad</tool_call>", "error", "Error: the tool call is not valid JSON"),
    ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "error", "Error: search needs"),
    ('<tool_call>{"name": "image_search"}</tool_call>', "image_search", ""),
    ('<tool_call>{"name": "image_search", "arguments": {"q": 1}}</tool_call>', "error", "Error: image_search takes"),
    ('<tool_call>{"name": "browse"}</tool_call>', "error", "Error: unknown tool 'browse'"),
    ("<code>```python\nx=1\n```</code><tool_call>{\"name\": \"image_search\"}</tool_call>", "code", "x=1\n"),
    ("I think it is red.", "none", ""),
])
def test_parse_action_follows_spec_precedence(turn, kind, arg):
    action = T.parse_action(turn)
    assert action.kind == kind and action.arg.startswith(arg)


def test_code_observation_format():
    r = dict(stdout="4\n", stderr="", images=[Image.new("RGB", (4, 4))] * 2)
    assert T.format_code_result(r) == ("Code execution result:\nstdout:\n```\n4\n\n```\n\nstderr:\n```\n\n```\n\n"
                                       "Images:\n" + M.IMAGE_PLACEHOLDER * 2)


# ================================================================================================ rollout.py
import rollout as R

SCRIPT = ["<think>crop</think><code>\n```python\nimage_1.crop((0, 0, 20, 20)).show()\nprint(image_1.size)\n```\n</code>",
          '<think>look it up</think><tool_call>{"name": "search", "arguments": {"query": "Eiffel Tower"}}</tool_call>',
          '<think>by image</think><tool_call>{"name": "image_search"}</tool_call>',
          "<think>oops</think><tool_call>{not json</tool_call>",
          "</think><answer>1889</answer><|im_end|>"]


def scripted(turns):
    return lambda traj, turn: turns[turn]


def sample(colour="red"):
    return R.Sample([Image.new("RGB", (64, 64), colour)], "When was it built?", "1889", "search")


def test_rollout_runs_every_tool_and_masks_exactly_the_model_tokens(tiny, search_url):
    model, processor, _ = tiny
    [t] = R.rollout(model, processor, [sample()], script=scripted(SCRIPT), search_url=search_url)
    assert t.finish == "answer" and t.turns == 5 and t.answer == "1889"
    assert dict(t.calls) == {"code": 1, "search": 1, "image_search": 1, "error": 1}
    assert "(64, 64)" in t.response and "found 1 results" in t.response and "Error: the tool call is not valid JSON" \
        in t.response and "A Google image search" in t.response
    assert len(t.seq.pixels) == 1 + 1 + 3                  # prompt image, the crop, three image-search results
    # the mask, token by token: model tokens are exactly the script's tokens, in order
    tok = processor.tokenizer
    model_tokens = [i for i, m in zip(t.seq.ids, t.action_mask) if m]
    assert model_tokens == [x for turn in SCRIPT for x in tok.encode(turn, add_special_tokens=False)]
    pads = [m for i, m in zip(t.seq.ids, t.action_mask) if i == tok.convert_tokens_to_ids("<|image_pad|>")]
    assert pads and not any(pads)                           # image pads of observations are never trained on
    assert all(m == 0 for m in t.action_mask[:t.prompt_len])


def conversation_of(traj, tok):
    """The trajectory as SFT data holds it: model turns are assistant messages, observations user ones."""
    text = __import__("re").sub(r"<\|vision_start\|>(<\|image_pad\|>)+<\|vision_end\|>", "<image>",
                                tok.decode(traj.seq.ids[traj.prompt_len:]))
    parts = text.split(R.OBS_PREFIX)
    msgs = [{"role": "system", "content": R.SYSTEM_PROMPT},
            {"role": "user", "content": "<image>" * len(traj.sample.images) + traj.sample.question + R.USER_SUFFIX},
            {"role": "assistant", "content": parts[0]}]
    for part in parts[1:]:
        obs, turn = part.split(R.OBS_SUFFIX)
        msgs += [{"role": "user", "content": obs}, {"role": "assistant", "content": "<think>" + turn}]
    msgs[-1]["content"] = msgs[-1]["content"].removesuffix("<|im_end|>")
    return msgs


SCRIPT_IMAGES = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (20, 20))] + [Image.new("RGB", (48, 48))] * 3


def test_rollout_ids_equal_chat_template_of_the_final_conversation(tiny, search_url):
    model, processor, _ = tiny
    [t] = R.rollout(model, processor, [sample()], script=scripted(SCRIPT), search_url=search_url)
    msgs = [dict(m, content=m["content"].replace("<image>", M.IMAGE_PLACEHOLDER))
            for m in conversation_of(t, processor.tokenizer)]
    ref = M.encode(processor, processor.apply_chat_template(msgs, tokenize=False), SCRIPT_IMAGES)
    assert ref.ids[:-1] == t.seq.ids                      # the template adds one "\n" after the final <|im_end|>


def test_rollout_logprobs_match_training_forward(tiny, search_url):
    model, processor, _ = tiny
    trajs = R.rollout(model, processor, [sample(), sample("blue")], n=2, script=scripted(SCRIPT), search_url=search_url)
    lp = M.token_logprobs(model, [t.seq for t in trajs])
    for b, t in enumerate(trajs):
        mask = torch.tensor(t.action_mask[1:], dtype=torch.bool)
        assert torch.allclose(lp[b, :len(t.seq.ids) - 1][mask], torch.tensor(t.logprobs[1:])[mask], atol=1e-4)


def test_kv_cache_across_turns_equals_re_prefill(tiny, search_url):
    model, processor, _ = tiny
    torch.manual_seed(0)
    a = R.rollout(model, processor, [sample()], script=scripted(SCRIPT), search_url=search_url, use_cache=True)[0]
    b = R.rollout(model, processor, [sample()], script=scripted(SCRIPT), search_url=search_url, use_cache=False)[0]
    assert a.seq.ids == b.seq.ids
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_sampled_batch_of_different_lengths_matches_one_at_a_time(tiny):
    model, processor, _ = tiny
    samples = [R.Sample([Image.new("RGB", (28 * (i + 1), 56))], "q" * (i * 7 + 1)) for i in range(3)]
    kw = dict(temperature=0, max_turn_tokens=12, max_turns=1)
    together = R.rollout(model, processor, samples, **kw)
    alone = [R.rollout(model, processor, [s], **kw)[0] for s in samples]
    for a, b in zip(together, alone):
        assert a.seq.ids == b.seq.ids and a.finish == "turn_tokens"
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_sampler_never_emits_banned_tokens(tiny):
    model, processor, _ = tiny
    banned = {processor.tokenizer.convert_tokens_to_ids(t) for t in R.BANNED}
    torch.manual_seed(0)
    trajs = R.rollout(model, processor, [sample()], n=4, temperature=5.0, max_turn_tokens=64, max_turns=1)
    sampled = {i for t in trajs for i, m in zip(t.seq.ids, t.action_mask) if m}
    assert sampled and not sampled & banned


def test_max_turns_cut_does_not_run_the_last_tool(tiny, search_url):
    model, processor, _ = tiny
    [t] = R.rollout(model, processor, [sample()], script=scripted([SCRIPT[1]] * 9), search_url=search_url, max_turns=3)
    assert t.finish == "max_turns" and t.turns == 3 and t.calls["search"] == 2 and t.action_mask[-1] == 1


def test_budget_cut_never_ends_on_observation_tokens(tiny, search_url):
    model, processor, _ = tiny
    [t] = R.rollout(model, processor, [sample()], script=scripted([SCRIPT[1]] * 9), search_url=search_url,
                    max_response_tokens=150)
    assert t.finish == "budget" and t.action_mask[-1] == 1 and len(t.seq.ids) - t.prompt_len <= 150


def test_infra_error_is_counted_and_observed(tiny):
    model, processor, _ = tiny
    [t] = R.rollout(model, processor, [sample()], script=scripted(SCRIPT[1:2] + SCRIPT[-1:]),
                    search_url="http://127.0.0.1:9")
    assert t.infra_errors == 1 and "backend is unavailable" in t.response and t.finish == "answer"
    [t] = R.rollout(model, processor, [sample()], script=scripted(SCRIPT[1:2] + SCRIPT[-1:]),
                    search_url="http://127.0.0.1:9", on_infra_error="end")
    assert t.finish == "infra_error"


# ================================================================================================ grpo.py
import grpo as G


@pytest.mark.parametrize("response,source,expected", [
    ("<think>ok</think><answer>1889</answer>", "reason", (1.0, 1.0, 1.0)),
    ("ok</think><answer>1889</answer>", "reason", (1.0, 1.0, 1.0)),                   # leading <think> assumed
    ("<think>ok</think><answer>1900</answer>", "reason", (0.2, 0.0, 1.0)),
    ("<think>ok<answer>1889</answer>", "reason", (0.8, 1.0, 0.0)),                    # </think> missing
    ("<think>a</think><code>x<think>b</think><answer>1889</answer>", "reason", (0.8, 1.0, 0.0)),   # open <code>
    ("<think>a</think><answer></answer>", "reason", (0.0, 0.0, 0.0)),                  # empty answer
    ("<think>a</think><answer>1889</answer></think>", "reason", (0.8, 1.0, 0.0)),     # no answer after last </think>
    ("<think>a</think><tool_call>{}</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>r</tool_response>"
     "<|im_end|>\n<|im_start|>assistant\n<think>b</think><answer>1889</answer>", "search", (0.8 * 0.9 + 0.2, 0.9, 1.0)),
    ("<think>a</think><tool_call>{}<think>b</think><answer>1889</answer>", "search", (0.8 * 0.9, 0.9, 0.0)),
    ("<think>a</think><answer>" + "1889 " * 70 + "</answer>", "reason", (0.0, 0.0, 0.0)),   # >= 300 characters
])
def test_reward_table(response, source, expected):
    r = G.compute_reward(response, "1889", source)
    assert (r["score"], r["acc"], r["format"]) == pytest.approx(expected)


@pytest.mark.parametrize("pred,gold,ok", [("(B) a cat", "B", 1), ("b", "B", 1), ("C", "B", 0), ("1,234", "1234", 1),
                                          ("\\boxed{\\frac12}", "\\frac12", 1), ("0.5", "1/2", 1), ("42 cm", "42", 1),
                                          ("The Eiffel Tower.", "eiffel tower", 1), ("41", "42", 0), (None, "1", 0)])
def test_rule_judge(pred, gold, ok):
    assert G.rule_judge(pred, gold) == ok


def test_group_advantages_by_hand():
    adv = G.group_advantages([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5], 4)
    # mean 0.25; unbiased variance (0.75^2 + 3 * 0.25^2) / 3 = 0.25, so std 0.5
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert torch.all(adv[4:] == 0)                                # an all-equal group contributes nothing


def test_policy_loss_clip_and_dual_clip_by_hand():
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    # positive advantage, ratio e^0.5 = 1.65 > 1.2: clipped to 1.2 -> loss -1.2 * A
    loss, cf = G.policy_loss(torch.full((1, 3), 0.5), old, torch.tensor([2.0]), mask)
    assert loss.item() == pytest.approx(-2.4) and cf.item() == 1.0
    # negative advantage, huge ratio e^3: -A * ratio = 20.1 > 3 |A| = 3 -> dual-clipped to 3
    loss, _ = G.policy_loss(torch.full((1, 3), 3.0), old, torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx(3.0)
    # ratio 1: plain -A
    loss, cf = G.policy_loss(old.clone(), old, torch.tensor([0.7]), mask)
    assert loss.item() == pytest.approx(-0.7) and cf.item() == 0.0


def test_policy_loss_is_a_mean_per_sequence_then_over_sequences():
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1., 0, 0, 0], [1, 1, 1, 1]])
    loss, _ = G.policy_loss(logp, torch.zeros(2, 4), torch.tensor([1.0, 1.0]), mask)
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-0.5)          # one token carries its whole sequence
    assert logp.grad[1].tolist() == pytest.approx([-0.125] * 4)
    assert torch.all(logp.grad[0, 1:] == 0)                        # masked tokens: exactly zero gradient


def test_one_grpo_step_moves_positive_advantage_tokens_up(tiny, search_url):
    model, processor, _ = tiny
    good = ["<think>look</think><answer>1889</answer><|im_end|>"]
    bad = ["<think>guess</think><answer>1900</answer><|im_end|>"]
    trajs = R.rollout(model, processor, [sample()], n=1, script=scripted(good)) + \
        R.rollout(model, processor, [sample()], n=1, script=scripted(bad))
    G.score_all(trajs)
    adv = G.group_advantages([t.reward["score"] for t in trajs], 2)
    assert adv[0] > 0 > adv[1]
    before = [M.token_logprobs(model, [t.seq])[0] for t in trajs]
    args = G.parse_args(["--tiny", "--group", "2", "--mini-batch", "1", "--lr", "1e-2"])
    work = __import__("copy").deepcopy(model).train()
    G.grpo_update(work, torch.optim.AdamW(work.parameters(), lr=args.lr), trajs, adv, args)
    after = [M.token_logprobs(work, [t.seq])[0] for t in trajs]
    m0 = torch.tensor(trajs[0].action_mask[1:], dtype=torch.bool)
    m1 = torch.tensor(trajs[1].action_mask[1:], dtype=torch.bool)
    gain = [after[k][m].sum() - before[k][m].sum() for k, m in ((0, m0), (1, m1))]
    assert gain[0] > 0 and gain[0] > gain[1]   # shared tokens may rise in both; the rewarded sequence rises more


def test_grpo_update_does_not_depend_on_trajectory_order_within_a_step(tiny):
    model, processor, _ = tiny   # grpo_update sorts each step's trajectories by length: legal only if order is free
    trajs = R.rollout(model, processor, [sample()], n=1, script=scripted(["<think>a</think><answer>1</answer>"])) + \
        R.rollout(model, processor, [sample()], n=1, script=scripted(["<think>a b c d</think><answer>22</answer>"]))
    args = G.parse_args(["--tiny", "--group", "2", "--mini-batch", "1"])
    adv = torch.tensor([-1.0, 1.0])
    updated = []
    for order in ([0, 1], [1, 0]):
        work = __import__("copy").deepcopy(model).train()
        G.grpo_update(work, torch.optim.SGD(work.parameters(), lr=1e-2), [trajs[k] for k in order], adv[order], args)
        updated.append(torch.cat([p.detach().flatten() for p in work.parameters()]))
    moved = updated[0] - torch.cat([p.detach().flatten() for p in model.parameters()])
    assert moved.abs().max() > 1e-4 and torch.allclose(updated[0], updated[1], atol=1e-6)


def test_checkpoint_is_atomic_and_resumes(tiny, tmp_path):
    model, processor, _ = tiny
    work = __import__("copy").deepcopy(model)
    opt = torch.optim.AdamW(work.parameters(), lr=1e-3)
    M.save_checkpoint(str(tmp_path), work, processor, opt, 7)
    assert os.listdir(tmp_path) == ["checkpoint"]
    fresh, _ = M.load_model(str(tmp_path / "checkpoint"), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(work.state_dict().values(), fresh.state_dict().values()))
    assert M.load_checkpoint(str(tmp_path), torch.optim.AdamW(fresh.parameters(), lr=1e-3)) == 7


# ================================================================================================ sft.py
def test_sft_tokens_are_the_rollout_tokens_and_labels_its_action_mask(tiny, search_url):
    model, processor, _ = tiny
    [t] = R.rollout(model, processor, [sample()], script=scripted(SCRIPT), search_url=search_url)
    seq, labels = S.encode_conversation(processor, conversation_of(t, processor.tokenizer), SCRIPT_IMAGES,
                                        max_pixels=M.RL_MAX_PIXELS)
    assert seq.ids == t.seq.ids and seq.grids == t.seq.grids
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    differ = [i for i, (a, b) in enumerate(zip(labels, t.action_mask)) if a != b]
    # the only difference, token by token: SFT also trains the <|im_end|> closing each of the 4 tool turns,
    # which a rollout's observation writes (generation stops at </code> / </tool_call>)
    assert len(differ) == len(SCRIPT) - 1 and all(seq.ids[i] == im_end and labels[i] == 1 for i in differ)
    assert labels[-1] == 1 and seq.ids[-1] == im_end      # the final EOS is trained on


def write_sft_set(root, n=4):
    """n short conversations over coloured images, the answer readable from the image colour."""
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"][:n]):
        Image.new("RGB", (56, 56), colour).save(root / f"{colour}.png")
        rows.append({"images": [f"{colour}.png"], "messages": [
            {"role": "user", "content": "<image>Which colour is it?"},
            {"role": "assistant", "content": "<think>crop</think><code>\n```python\nprint(1)\n```\n</code>"},
            {"role": "user", "content": "Code execution result:\nstdout:\n```\n1\n```"},
            {"role": "assistant", "content": f"<think>it is {colour}</think><answer>{colour}</answer>"}]})
    path = root / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sft_loss_falls_by_half_on_a_small_fixed_set(tiny, tmp_path):
    data = write_sft_set(tmp_path)
    S.train(S.parse_args(["--tiny", "--model", tiny[2], "--data", data, "--out", str(tmp_path / "run"),
                          "--epochs", "15", "--lr", "1e-2"]))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]


def test_sft_resume_is_exact_and_vision_stays_frozen(tiny, tmp_path):
    data = write_sft_set(tmp_path)
    args = lambda out, *extra: S.parse_args(["--tiny", "--model", tiny[2], "--data", data, "--out", str(out), *extra])
    straight = S.train(args(tmp_path / "a", "--steps", "4"))
    S.train(args(tmp_path / "b", "--steps", "2"))
    resumed = S.train(args(tmp_path / "b", "--steps", "4", "--resume"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    start = tiny[0].state_dict()
    moved = {k for k, v in straight.state_dict().items() if not torch.equal(v, start[k])}
    assert moved and not any(".visual." in k or k.startswith("visual") for k in moved)
    assert any("layers.0.mlp" in k for k in moved)


def test_sft_converter_keeps_good_rows_and_reports_bad_ones_by_line(tmp_path, capsys):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    good = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "<answer>x</answer>"}],
            "images": ["a.png"]}
    sharegpt = {"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"},
                                  {"from": "observation", "value": "out"}, {"from": "gpt", "value": "B"}],
                "images": ["a.png"]}
    two_holes = {"messages": [{"role": "user", "content": "<image><image>Q"}, {"role": "assistant", "content": "A"}],
                 "images": ["a.png"]}
    missing = dict(good, images=["nope.png"])
    (tmp_path / "src.json").write_text(json.dumps([good, two_holes, sharegpt, missing], indent=1))
    (tmp_path / "out").mkdir()
    S.convert(str(tmp_path / "src.json"), str(tmp_path), str(tmp_path / "out" / "sft.jsonl"))
    err = capsys.readouterr().err
    starts = [i for i, line in enumerate((tmp_path / "src.json").read_text().splitlines(), 1) if line == " {"]
    assert f"src.json:{starts[1]}: skipped (2 <image> placeholders but 1 images)" in err
    assert f"src.json:{starts[3]}: skipped (missing image" in err and err.count("skipped") == 2
    rows = S.load_conversations(str(tmp_path / "out" / "sft.jsonl"))
    assert len(rows) == 2 and [m["role"] for m in rows[1][0]] == ["user", "assistant", "user", "assistant"]
    assert os.path.exists(rows[0][1][0])


def test_sft_loader_reports_bad_lines_by_number(tmp_path, capsys):
    path = write_sft_set(tmp_path, 2)
    with open(path, "a") as f:
        f.write("{not json\n" + json.dumps({"images": [], "messages": [{"role": "user", "content": "<image>"}]}) + "\n")
    assert len(S.load_conversations(path)) == 2
    err = capsys.readouterr().err
    assert "sft.jsonl:3: skipped" in err and "sft.jsonl:4: skipped" in err


def test_adamw_equals_torch_on_float32_and_keeps_small_bf16_updates():
    torch.manual_seed(0)
    w = torch.randn(64, 8)
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opts = [M.AdamW([ours], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)]
    for _ in range(5):
        g = torch.randn(64, 8)
        for p, o in zip((ours, ref), opts):
            p.grad = g.clone(); o.step()
    assert torch.allclose(ours, ref, atol=1e-6)
    # 100 steps of lr 1e-4 on weights of 1.0 (bf16 ulp there: 2^-7): Adam moves each by ~0.01 in total
    moved = []
    for opt_class in (M.AdamW, torch.optim.AdamW):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = opt_class([p], lr=1e-4, weight_decay=0.0)
        for _ in range(100):
            p.grad = torch.ones_like(p); opt.step()
        moved.append(1 - p.float().mean().item())
    assert moved[0] == pytest.approx(0.01, rel=0.1)   # stochastic rounding: unbiased
    assert moved[1] < 0.002                            # round-to-nearest loses most of it


# ================================================================================================ eval.py
MATHVISION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "benchdata",
                          "mathvision_testmini", "testmini.jsonl")
TINY_EVAL = dict(max_turns=2, max_turn_tokens=32, max_pixels=56 * 56 * 4)


def answering(text_of):
    """A scripted policy that answers at once with text_of(traj)."""
    return lambda traj, turn: f"<think>so</think><answer>{text_of(traj)}</answer><|im_end|>"


@pytest.mark.parametrize("pred,item,expected", [
    ("(B) a cat", dict(answers=["B"], options=["a dog", "a cat"]), 1.0),
    ("a cat", dict(answers=["B"], options=["a dog", "a cat"]), 1.0),          # option text counts as its letter
    ("A", dict(answers=["B"], options=["a dog", "a cat"]), 0.0),
    ("paris", dict(answers=["Lyon", "Paris"]), 1.0),                            # RealX " or " alternatives
    ("104", dict(answers=["100"], tolerance=0.05), 1.0),                        # ChartQA: within 5 %
    ("106", dict(answers=["100"], tolerance=0.05), 0.0),
    ("100.5", dict(answers=["100"]), 0.0),                                      # default: exact numbers
    (None, dict(answers=["1"]), 0.0),
])
def test_eval_scorer_table(pred, item, expected):
    assert E.score(pred, E.Item("x", "q", images=[], **item)) == expected


def test_eval_scorer_asks_the_judge_only_when_rules_fail_and_never_scores_its_outage():
    calls = []
    judge = lambda q, pred, gold: calls.append(pred) or 1.0
    item = E.Item("x", "q", ["1889"], [])
    assert E.score("1889", item, judge) == 1.0 and calls == []
    assert E.score("eighteen eighty-nine", item, judge) == 1.0 and calls == ["eighteen eighty-nine"]

    def down(*a):
        raise __import__("grpo").JudgeError("unreachable")
    assert E.score("eighteen eighty-nine", item, down) is None


def test_eval_table_per_skill_flag_and_integration(capsys):
    row = lambda ok, flags, calls, infra=False: dict(correct=ok, groups=flags, calls=calls, turns=2, infra_error=infra)
    rows = [row(1.0, ["perception", "search", "reason", "integration"], {"code": 1, "search": 2}),
            row(0.0, ["perception"], {"code": 1}), row(1.0, ["search"], {"search": 1}),
            row(0.0, ["reason"], {}), row(0.0, ["search"], {"search": 1}, infra=True)]
    s = E.summarize(rows, "RealX")
    assert s["scored"] == 4 and s["infra_errors"] == 1 and s["accuracy"] == 50.0
    assert s["groups"]["integration"] == dict(n=1, accuracy=100.0) and s["groups"]["search"]["accuracy"] == 100.0
    assert s["groups"]["perception"]["accuracy"] == 50.0 and s["tool_rate"] == {"code": 50.0, "search": 50.0}
    assert s["tool_calls_per_item"] == 1.25
    assert "1 with infrastructure errors" in capsys.readouterr().out


def test_eval_resumes_after_a_crash_without_redoing_items(tiny, tmp_path):
    model, processor, _ = tiny
    items = E.load_mathvision(MATHVISION)[:6]
    seen = []

    def crash_on_fourth(traj, turn):
        seen.append(traj.sample.id)
        if traj.sample.id == items[3].id:
            raise KeyboardInterrupt   # Ctrl-C in the second batch
        return answering(lambda t: t.sample.answer)(traj, turn)
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(model, processor, items, str(tmp_path), batch=3, script=crash_on_fourth, **TINY_EVAL)
    assert len(open(tmp_path / "predictions.jsonl").readlines()) == 3      # the first batch is on disk
    seen.clear()
    gold = answering(lambda t: t.sample.answer)
    rows = E.evaluate(model, processor, items, str(tmp_path), batch=3,
                      script=lambda traj, turn: seen.append(traj.sample.id) or gold(traj, turn), **TINY_EVAL)
    assert set(seen) == {it.id for it in items[3:]}                        # the rerun skips what is done
    assert [r["id"] for r in rows] == [it.id for it in items] and all(r["correct"] == 1.0 for r in rows)
    assert len(open(tmp_path / "predictions.jsonl").readlines()) == 6      # nothing written twice


def test_eval_reports_malformed_benchmark_lines_and_skips_them(tmp_path, capsys):
    lines = open(MATHVISION).read().splitlines()[:5]
    lines.insert(2, "{broken")
    path = tmp_path / "testmini.jsonl"
    path.write_text("\n".join(lines) + "\n")
    os.symlink(os.path.join(os.path.dirname(MATHVISION), "images"), tmp_path / "images")
    assert len(E.load_mathvision(str(path))) == 5
    assert "testmini.jsonl:3: skipped" in capsys.readouterr().err


def test_eval_on_real_mathvision_testmini_end_to_end(tiny, tmp_path):
    model, processor, _ = tiny
    items = E.load("mathvision", MATHVISION)
    assert len(items) == 304 and all(os.path.exists(it.images[0]) for it in items)
    right = E.evaluate(model, processor, items, str(tmp_path / "gold"), batch=64,
                       script=answering(lambda t: t.sample.answer), **TINY_EVAL)
    assert E.summarize(right, "gold")["accuracy"] == 100.0
    wrong = E.evaluate(model, processor, items, str(tmp_path / "A"), batch=64, script=answering(lambda t: "A"),
                       **TINY_EVAL)
    expected = sum(it.answers[0] == "A" for it in items)
    assert 0 < expected < 304 and sum(r["correct"] for r in wrong) == expected
    first = json.loads(open(tmp_path / "A" / "predictions.jsonl").readline())
    assert first["images"] == [items[0].image_paths[0]] and first["trajectory"].count("<image>") == 1


def test_eval_saves_tool_output_images_by_path(tiny, tmp_path):
    model, processor, _ = tiny
    item = E.Item("q/1", "How big?", ["1889"], [os.path.join(os.path.dirname(MATHVISION), "images", "4.jpg")],
                  image_paths=["4.jpg"])
    [row] = E.evaluate(model, processor, [item], str(tmp_path), script=scripted([SCRIPT[0], SCRIPT[-1]]),
                       **dict(TINY_EVAL, max_turn_tokens=96))
    assert row["images"][0] == "4.jpg" and row["trajectory"].count("<image>") == len(row["images"]) == 2
    assert Image.open(tmp_path / row["images"][1]).size == (20, 20)   # the crop the code showed, as a file


# ================================================================================================ the miniature
def test_miniature_world_is_seeded_and_its_expert_is_right(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    import world
    a, b = world.build(str(tmp_path / "a"), 3, 4, 2, 2), world.build(str(tmp_path / "b"), 3, 4, 2, 2)
    for name in ("sft_items.jsonl", "heldout.jsonl", "corpus.jsonl", "sft.jsonl"):
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read().replace(b, a), name
    held = [json.loads(line) for line in open(os.path.join(a, "heldout.jsonl"))]
    trained = {json.loads(line)["question"] for line in open(os.path.join(a, "sft_items.jsonl"))}
    assert {h["category"] for h in held} == set(world.CATEGORIES)
    assert not {h["question"] for h in held if h["category"] == "search"} & trained   # new towns only
    cold = {q.split("{")[0] for q in world.COLD_QUESTION.values()}   # the cold start sees one wording a category
    assert all(any(q.startswith(c) for c in cold) for q in trained)
    assert {h["wording"] for h in held} == {"cold-start", "new"}
    assert all((h["wording"] == "new") == (h["question"] not in world.COLD_QUESTION.values()) for h in held
               if h["category"] != "search")
    convs = [json.loads(line) for line in open(os.path.join(a, "sft.jsonl"))]
    assert len(convs) == 16 and all(c["messages"][-1]["content"].endswith("</answer>") for c in convs)


def test_miniature_pipeline_trained_model_beats_untrained_and_its_own_no_tool_run(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    import world
    res = world.pipeline(str(tmp_path / "world"), str(tmp_path / "runs"), n_sft=64, n_rl=4, n_heldout=6,
                         rl_steps=1, sft_epochs=3)   # the quick start, shortened: 256 conversations x 3, 1 GRPO batch
    assert res["untrained"]["tool_calls_per_item"] < res["SFT"]["tool_calls_per_item"]
    # measured at seed 0: untrained 0, SFT 70.8, SFT+GRPO 83.3, tools disabled 8.3 (24 items); the target is +20 points
    assert res["SFT+GRPO"]["accuracy"] >= res["untrained"]["accuracy"] + 20
    assert res["SFT+GRPO"]["accuracy"] >= res["SFT+GRPO, tools disabled"]["accuracy"] + 20


def test_eval_loads_vlmevalkit_tsv_and_realx_jsonl(tmp_path):
    buf = __import__("io").BytesIO()
    Image.new("RGB", (30, 20), "red").save(buf, format="PNG")
    b64 = __import__("base64").b64encode(buf.getvalue()).decode()
    (tmp_path / "v.tsv").write_text("index\timage\tquestion\tA\tB\tC\tanswer\tcategory\n"
                                    f"7\t{b64}\tWhat colour?\tred\tblue\t\tA\tdirect_attributes\n")
    [v] = E.load_tsv(str(tmp_path / "v.tsv"))
    assert v.options == ["red", "blue"] and v.answers == ["A"] and v.groups == ["direct_attributes"]
    assert "(B) blue" in v.question and Image.open(__import__("io").BytesIO(v.images[0])).size == (30, 20)
    assert E.score("red", v) == 1.0 and E.score("(B)", v) == 0.0
    Image.new("RGB", (30, 20)).save(tmp_path / "r.png")
    rows = [dict(query="Where?", answer="Paris or Lyon", perception=1, search=1, reason=1, image="r.png"),
            dict(query="Who?", answer="Ada", perception=0, search=1, reason=0, image="r.png")]
    (tmp_path / "realx.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = E.load_realx(str(tmp_path / "realx.jsonl"))
    assert a.groups == ["perception", "search", "reason", "integration"] and a.answers == ["Paris", "Lyon"]
    assert b.groups == ["search"] and b.data_source == "search" and E.score("lyon", a) == 1.0
