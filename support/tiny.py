"""support/tiny.py -- a Qwen2.5-VL in miniature, built locally in seconds, for the tests and the miniature world.

`build_tiny(path, preset)` writes a random-weight Qwen2.5-VL (the real architecture, a few million parameters)
with a processor, saved as the hub saves one, so that `model.load_model(path)` loads it like the 7B. Its tokenizer
is a byte-level BPE trained here on the project's own text, pre-tokenised as Qwen2's and with Qwen's special
tokens; or `qwen_tokenizer()`, the real Qwen2.5 vocabulary rebuilt offline from qwen-agent's qwen.tiktoken (the
same 151,643 ranks and 22 added tokens as the hub's tokenizer.json).

  python -m support.tiny /tmp/tiny [--preset mini]   # build and save one, reload it and score a sample
"""
import argparse
import os

import torch
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from PIL import Image

from tools import IMAGE_PLACEHOLDER
from model import MIN_PIXELS, QWEN_ADDED, RL_MAX_PIXELS, Processor, Qwen2VLImageProcessorPil, encode, load_model, \
    token_logprobs

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


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
    """The text the tiny tokenizer is trained on: the original's prompts, the small search corpus and
    the MATH-Vision questions shipped in data/. Files that do not change: a tokenizer trained on the
    code and docs gave the tests another model at every edit (and a tolerance that held for one
    model could fail for the next)."""
    data = os.path.join(HERE, "data")
    # the original's system, user and judge prompts by name: files added later (SOURCE.md, the eval
    # judges' prompts) would change the tokenizer, and so the tests' model
    names = ["agent_system_prompt.txt", "agent_user_prompt.txt", "code_system_prompt.txt", "code_user_prompt.txt",
             "direct_system_prompt.txt", "judge_system_prompt.md", "judge_user_prompt.txt", "math_judge_prompt.txt"]
    paths = [os.path.join(data, "prompts", n) for n in names]
    paths += [os.path.join(data, "corpus.jsonl"), os.path.join(data, "mathvision_testmini", "testmini.jsonl")]
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="ignore") as f:
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
    ap.add_argument("dir", help="build a tiny random Qwen2.5-VL into DIR and check it")
    ap.add_argument("--preset", default="test", choices=sorted(TINY_PRESETS), help="tiny model size preset")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = ap.parse_args()
    build_tiny(args.dir, args.preset, args.seed)
    model, processor = load_model(args.dir, device="cpu")
    seq = encode(processor, f"<|im_start|>user\n{IMAGE_PLACEHOLDER}What is this?<|im_end|>\n",
                 [Image.new("RGB", (64, 64), "red")])
    lp = token_logprobs(model, [seq])
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny model ({args.preset}, {n / 1e6:.2f}M params) in {args.dir}: {len(seq.ids)} tokens, "
          f"mean log-prob {lp.sum().item() / (len(seq.ids) - 1):.3f}")


if __name__ == "__main__":
    main()
