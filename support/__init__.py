"""Machinery a first reading can skip: each module opens with what it does. The six stage files at the top level
(model, tools, rollout, sft, grpo, eval) are the paper; this folder is what makes them run safely, fast and at scale."""
