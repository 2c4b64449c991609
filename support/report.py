"""support/report.py -- pictures of a run: eval's one-page HTML report, and a GRPO run's curves.

`python eval.py report RUN_DIR` writes RUN_DIR/report.html: one self-contained page (images embedded, no server,
no CDN) with the summary table and one card per item: the question and its images, every turn in order
(thinking, code, the tool's output and the images it showed, search results), the answer, the gold answer and the
verdict; a filter shows only wrong, right, or items that used a tool. Everything the model or a tool wrote is
escaped. `python -m support.report METRICS` draws reward, accuracy, tool calls, length and entropy per batch.
"""
import base64
import json
import os
import re
import sys


REPORT_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
.card{border:1px solid #bbb;border-radius:6px;margin:1.2em 0;padding:.6em 1em}.card.right{border-left:6px solid #2a2}
.card.wrong{border-left:6px solid #c33}.card.infra{border-left:6px solid #888}pre{white-space:pre-wrap;margin:.3em 0;
padding:.4em;background:#f6f6f6;border-radius:4px;overflow-wrap:anywhere}p{overflow-wrap:anywhere}.think{color:#666;font-style:italic}.code{background:#eef3ff}
.call{background:#fff4e0}.answer{font-weight:bold;background:#e8f7e8}.obs{background:#fafafa;border-left:3px solid #ddd}
img{max-width:320px;max-height:320px;border:1px solid #ccc;margin:3px}.turn{margin:.5em 0}.role{font-size:12px;
color:#888;text-transform:uppercase}"""


REPORT_FILTER = """function show(v){for(const c of document.querySelectorAll('.card')){const k=c.dataset;
c.style.display=(v=='all'||(v=='right'&&k.verdict=='right')||(v=='wrong'&&k.verdict=='wrong')||
k.tools.split(' ').includes(v))?'':'none'}}"""


TAGGED = re.compile(r"(<think>.*?</think>|<code>.*?</code>|<tool_call>.*?</tool_call>|<answer>.*?</answer>)", re.S)


def write_html(run_dir, rows, summary, proto, data_root=None):
    """run_dir/report.html from eval's rows (`latest_rows`), its summary (`summarize`) and protocol: one
    self-contained page with the summary table and one card per item: question and input images, every turn in
    order (thinking, code, tool output and its images, search results), the answer, the gold answer and the
    verdict. Everything the model or a tool wrote is escaped."""
    import html
    data_root = data_root or os.path.dirname(proto.get("data", ""))   # where input images are named from
    run = [f"{k} {v}" for k, v in (("model", proto.get("model")), ("prompt", proto.get("prompt", {}).get("name"))) if v]
    esc = html.escape

    def image_tag(name):
        for where in (os.path.join(run_dir, name), os.path.join(data_root, name)):
            if os.path.isfile(where):
                return f'<img src="data:image/png;base64,{base64.b64encode(open(where, "rb").read()).decode()}">'
        return f"<span>[image {esc(name)} not found]</span>"

    def with_images(text, images, css):   # text with "<image>" marks -> escaped blocks and the images in order
        parts = text.split("<image>")
        out = [f'<pre class="{css}">{esc(p)}</pre>' if p.strip() else "" for p in parts[:1]]
        for p in parts[1:]:
            out.append(image_tag(images.pop(0)) if images else "")
            out.append(f'<pre class="{css}">{esc(p)}</pre>' if p.strip() else "")
        return "".join(out)

    def model_turn(text, images):
        css = lambda part: next((c for tag, c in (("<think>", "think"), ("<code>", "code"), ("<tool_call>", "call"),
                                                  ("<answer>", "answer")) if part.startswith(tag)), "plain")
        return "".join(with_images(part, images, css(part)) for part in TAGGED.split(text) if part.strip())

    cards = []
    for r in rows:
        images = list(r.get("images", []))
        turns = [t.split("\n", 1) for t in r["trajectory"].split("<|im_start|>")[1:]]
        body = []
        for k, (role, text) in enumerate(turns):
            text = text.replace("<|im_end|>", "").rstrip("\n")
            if role == "system":
                body.append(f"<details><summary class=role>system prompt</summary><pre>{esc(text)}</pre></details>")
            elif role == "user":
                label = "question" if k <= 1 else "tool output"
                body.append(f'<div class=turn><div class=role>{label}</div>'
                            f'{with_images(text, images, "plain" if k <= 1 else "obs")}</div>')
            else:
                body.append(f'<div class=turn><div class=role>model</div>{model_turn(text, images)}</div>')
        verdict = "infra" if r["infra_error"] else "right" if r["correct"] else "wrong"
        tools = " ".join(k for k, v in r["calls"].items() if v)
        cards.append(f'<div class="card {verdict}" data-verdict="{verdict}" data-tools="{esc(tools)}">'
                     f'<h3>{esc(str(r["id"]))} &middot; {verdict}</h3>{"".join(body)}'
                     f'<p><b>answer:</b> {esc(str(r["prediction"]))} &nbsp; <b>gold:</b> '
                     f'{esc(" | ".join(map(str, r["answers"])))} &nbsp; <b>finish:</b> {esc(r["finish"])} '
                     f'&nbsp; <b>tools:</b> {esc(tools or "none")}</p></div>')
    groups = "".join(f"<tr><td style=text-align:left>{esc(g)}</td><td>{v['n']}</td><td>{v['accuracy']:.1f}</td></tr>"
                     for g, v in summary["groups"].items())
    rates = ", ".join(f"{esc(k)} {v:.0f}%" for k, v in summary["tool_rate"].items()) or "none"
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{esc(summary['label'])}</title>"
            f"<style>{REPORT_STYLE}</style><script>{REPORT_FILTER}</script></head><body>"
            f"<h1>{esc(summary['label'])}</h1><p>{esc(', '.join(run) + '; ' if run else '')}{summary['scored']} "
            f"items scored, "
            f"{summary['infra_errors']} infrastructure errors</p><table><tr><th>group</th><th>items</th>"
            f"<th>accuracy</th></tr><tr><td style=text-align:left>overall</td><td>{summary['scored']}</td>"
            f"<td>{summary['accuracy']:.1f}</td></tr>{groups}</table><p>tool-call rate: {rates}; calls per item "
            f"{summary['tool_calls_per_item']:.2f}; mean turns {summary['mean_turns']:.2f}</p>"
            f"<p>show <select onchange=show(this.value)><option value=all>all</option><option value=wrong>wrong"
            f"</option><option value=right>right</option><option value=code>used code</option><option "
            f"value=search>used search</option><option value=image_search>used image search</option></select></p>"
            f"{''.join(cards)}</body></html>")
    out = os.path.join(run_dir, "report.html")
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {out} ({len(rows)} items)")
    return out


def plot(metrics_path, out=None):
    """The run's curves, one panel each: reward, accuracy, tool calls per sample, response length and entropy per
    rollout batch (the paper's Fig. 8 shows the first three), and the validation accuracy where the run had
    --val-data -> a PNG beside the metrics (or `out`). Batches are faint points, their running mean the line; the
    reward panel marks the mean of the first and of the last quarter of the batches (the rise, or none)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    if not rows:
        sys.exit(f"error: {metrics_path} holds no metrics")
    curves = {"reward": [r["reward"] for r in rows], "accuracy": [r["acc"] for r in rows],
              "tool calls / sample": [r["code_calls"] + r["search_calls"] + r["image_search_calls"] for r in rows],
              "response tokens": [r["response_tokens"] for r in rows],
              "entropy": [r.get("entropy", float("nan")) for r in rows]}
    curves = {name: ([r["step"] for r in rows], ys) for name, ys in curves.items()}
    val = [r for r in rows if "val_acc" in r]
    if val:
        curves["validation accuracy"] = ([r["step"] for r in val], [r["val_acc"] for r in val])
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.6))
    for ax, (name, (xs, ys)) in zip(axes, curves.items()):
        # each batch is another draw of prompts: the raw points are faint, their running mean is the line
        ax.plot(xs, ys, ".", color="tab:blue", alpha=0.35)
        ax.plot(xs, running_mean(ys), color="tab:blue", lw=2)
        title = name
        if name == "reward" and len(ys) >= 4:   # the rise, as the paper's Fig. 8 shows it
            q, (first, last) = len(ys) // 4, quarter_means(ys)
            ax.hlines([first, last], [xs[0], xs[-q]], [xs[q - 1], xs[-1]], colors="tab:red", linestyles="--")
            title = f"reward: first quarter {first:.2f}, last {last:.2f}"
        if name == "validation accuracy":   # the checkpoint --keep-best keeps: the best, of equals the first
            k = ys.index(max(ys))
            ax.plot(xs[k], ys[k], "o", mfc="none", mec="tab:red", ms=10)
            title = f"greedy validation: best {ys[k]:.2f} at batch {xs[k]}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("rollout batch", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    out = out or os.path.splitext(metrics_path)[0] + ".png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def quarter_means(ys):
    """The mean of the first and of the last quarter of the points (one point each if fewer than four)."""
    q = max(1, len(ys) // 4)
    return sum(ys[:q]) / q, sum(ys[-q:]) / q


def running_mean(ys, window=None):
    """The mean of the last `window` points at each point (default: an eighth of the run, at least 3)."""
    window = window or max(3, len(ys) // 8)
    spans = (ys[max(0, i + 1 - window):i + 1] for i in range(len(ys)))
    return [sum(span) / len(span) for span in spans]


def main():
    import argparse
    ap = argparse.ArgumentParser(description="draw a GRPO run's curves from its metrics JSONL")
    ap.add_argument("metrics", help="runs/.../metrics.jsonl (written by grpo.py)")
    ap.add_argument("--out", help="the PNG (default: beside the metrics)")
    args = ap.parse_args()
    plot(args.metrics, args.out)


if __name__ == "__main__":
    main()
