"""support/runs.py -- run folders that survive a crash: atomic checkpoints, exact resume, files replaced whole.

A checkpoint is the model and processor as the hub saves them, plus the optimizer, scheduler, step and RNG state,
written to a temporary folder and renamed into place, with `trainer.json` written last and holding every file's
size: a folder that has it, with every file at its size, is complete; anything else is not, and is never resumed
from. `open_run` makes a run folder safe before anything loads: it recovers from a crash inside a save, refuses to
overwrite a finished run, and on --resume drops the metrics of the steps that will be trained again (the file is
replaced whole, never rewritten in place). Checkpoints hold whole tensors keyed by parameter name, so a run saved
under torchrun resumes in one process and the other way round. `model_fingerprint` names a model's weights by
content (eval records it: a checkpoint replaced in place is another model).
"""
import glob
import hashlib
import json
import os
import shutil
import sys

import torch

from support.dist import rank


# --------------------------------------------------------------------------------------------- checkpoints, run folders
def save_checkpoint(out, model, processor, optimizer, step, scheduler=None):
    """Weights (safetensors, hub layout) + optimizer, scheduler, step and RNG state, written to a temp folder and
    renamed into place; `trainer.json` is written last, so a folder holding it is complete. A crash at any point
    leaves a complete checkpoint that open_run finds (the old one, or the new one not yet renamed)."""
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


