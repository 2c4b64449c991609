"""support/convert.py -- the released data into this repository's formats (data/README.md describes both).

  python -m support.convert sft DeepEyesV2_SFT.json --images-root DIR --out sft.jsonl   # cold-start conversations
  python -m support.convert rl DeepEyesV2_RL/*.parquet --out rl_data                   # RL prompts, prompts kept

A row that cannot be converted (its <image> placeholders and images disagree, an image is missing, no model turn)
is reported with its line and skipped. The RL rows keep the chat prompt each was trained with.
"""
import argparse
import json
import os
import re
import sys


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "observation": "user", "function": "user", "tool": "user"}   # tool outputs are user turns


def convert_sft(src, images_root, out):
    """DeepEyesV2_SFT json (a list, or JSONL) of sharegpt rows {messages|conversations, images} -> our JSONL.
    A row whose <image> placeholders and images disagree (or whose image is missing) is reported and skipped."""
    with open(src, encoding="utf-8") as f:
        raw = f.read()
    rows, dec, pos = [], json.JSONDecoder(), 0
    if raw.lstrip().startswith("["):   # walk the list item by item, so a bad row is reported with its line
        pos = raw.index("[") + 1
        while True:
            while pos < len(raw) and raw[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(raw) or raw[pos] == "]":
                break
            item, end = dec.raw_decode(raw, pos)
            rows.append((raw.count("\n", 0, pos) + 1, item))
            pos = end
    else:
        rows = [(n, json.loads(line)) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    out_dir, kept = os.path.dirname(os.path.abspath(out)), 0
    with open(out, "w", encoding="utf-8") as f:
        for line, row in rows:
            turns = row.get("messages") or row.get("conversations") or []
            messages = [{"role": ROLES[t.get("role", t.get("from"))], "content": t.get("content", t.get("value"))}
                        for t in turns if t.get("role", t.get("from")) in ROLES]
            images = [os.path.join(images_root, p) for p in row.get("images", [])]
            holes = sum(m["content"].count("<image>") for m in messages)
            missing = [p for p in images if not os.path.exists(p)]
            if holes != len(images) or missing or not any(m["role"] == "assistant" for m in messages):
                why = f"{holes} <image> placeholders but {len(images)} images" if holes != len(images) else \
                    f"missing image {missing[0]}" if missing else "no assistant turn"
                print(f"{src}:{line}: skipped ({why})", file=sys.stderr)
                continue
            f.write(json.dumps({"images": [os.path.relpath(p, out_dir) for p in images], "messages": messages},
                               ensure_ascii=False) + "\n")
            kept += 1
    print(f"wrote {kept} of {len(rows)} conversations to {out}")


def convert_rl(parquets, out):
    """Released DeepEyesV2_RL parquet -> our JSONL + image files (pyarrow is needed here, and only here)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("error: converting parquet needs pyarrow: pip install pyarrow")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    with open(os.path.join(out, "rl.jsonl"), "w") as f:
        for path in parquets:
            for i, row in enumerate(pq.read_table(path).to_pylist()):
                extra, names = row.get("extra_info") or {}, []
                for j, img in enumerate(row.get("images") or []):
                    name = f"images/{os.path.basename(path)}_{i}_{j}.png"
                    with open(os.path.join(out, name), "wb") as g:
                        g.write(img["bytes"])
                    names.append(name)
                question = extra.get("question") or re.sub(r"<image>", "", row["prompt"][-1]["content"]).strip()
                prompt = [dict(role=m["role"], content=m["content"]) for m in row.get("prompt") or []] or None
                f.write(json.dumps(dict(images=names, question=question, data_source=row.get("data_source", "reason"),
                                        answer=row["reward_model"]["ground_truth"], id=extra.get("index", i),
                                        prompt=prompt), ensure_ascii=False) + "\n")
    print(f"wrote {out}/rl.jsonl")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sft = sub.add_parser("sft", help="the released DeepEyesV2_SFT json -> conversations JSONL")
    sft.add_argument("src", help="the released json (a list of sharegpt rows) or a JSONL of them")
    sft.add_argument("--images-root", required=True, help="folder the rows' image paths are relative to")
    sft.add_argument("--out", required=True, help="output JSONL (image paths are written relative to it)")
    rl = sub.add_parser("rl", help="the released DeepEyesV2_RL parquet files -> rl.jsonl + images/")
    rl.add_argument("parquets", nargs="+", help="the released parquet files")
    rl.add_argument("--out", required=True, help="output folder (rl.jsonl + images/)")
    args = ap.parse_args(argv)
    if args.what == "sft":
        return convert_sft(args.src, args.images_root, args.out)
    return convert_rl(args.parquets, args.out)


if __name__ == "__main__":
    main()
