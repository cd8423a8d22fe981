"""Training the embedded models: reproducible from a seed, resumable, runnable in time-limited chunks.

``python -m vtc.models.tiny train --variant tiny-llava --steps 6000 --out runs/tiny-llava
--max-minutes 9 [--resume]`` trains (or continues) a run; when ``--steps`` is reached it exports the
HF folder to ``OUT/final`` (copy it to ``assets/<variant>``). Each step:

- builds the batch of that step (``batch.train_batch``: several questions per image as one
  conversation, loss on the answer words and ``</s>``);
- draws from a generator seeded by ``(seed, step)``: on ``prune_share`` of the steps a token count
  ``k`` log-uniform in ``[prune_min, N]`` and a random subset of ``k`` visual tokens per image,
  kept in their original order, with original position ids on ``original_positions_share`` of those
  steps and contiguous ones otherwise (so both of ``vtc.apply``'s position modes are in
  distribution); for ``tiny-mqt``, the query count ``m`` uniform over even ``2..M`` (MQT's nested
  dropout), tower frozen;
- adds the tower's auxiliary losses (``aux.py``) with weight ``aux_weight``;
- AdamW (betas 0.9/0.98, weight decay on matrices only), linear warm-up, cosine decay to
  ``min_lr_ratio``, gradient clipping.

Everything random is a function of ``(seed, step)``, so a run resumed from its checkpoint makes
bit-identical updates (the tests check it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vtc.errors import ConfigError
from vtc.models.tiny.aux import AuxHeads
from vtc.models.tiny.batch import train_batch
from vtc.models.tiny.checkpoint import CKPT_JSON, export_folder, load_checkpoint, save_checkpoint
from vtc.models.tiny.forward import assemble, encode_images, lm_hidden, loss_and_logits, random_subset
from vtc.models.tiny.variants import TrainRecipe, Variant, build_model, variant

__all__ = ["RunConfig", "Trainer", "train", "lr_at", "transfer_state"]


@dataclass
class RunConfig:
    """A training run: which variant, how far, where, and recipe/size overrides."""

    variant: str
    steps: int
    out: str
    resume: bool = False
    max_minutes: float | None = None
    threads: int | None = 2
    bf16: bool = False
    log_every: int = 10
    save_every: int = 200
    init: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    export: bool = True
    quiet: bool = False


def lr_at(step: int, steps: int, r: TrainRecipe) -> float:
    """Learning rate of ``step``: linear warm-up, then cosine to ``min_lr_ratio * lr`` at ``steps``."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    t = min(1.0, (step - r.warmup) / max(1, steps - r.warmup))
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def transfer_state(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``dst``'s state with every tensor ``src`` has in the same shape; a vision tower's position
    embeddings (CLS + a square grid) are resized bicubically to ``dst``'s grid (``tiny-llava`` ->
    ``tiny-llava-next``: 24x24 -> 16x16); tensors ``src`` lacks (LLaVA-NeXT's ``image_newline``)
    keep ``dst``'s initialisation. Any other mismatch is left for ``load_state_dict`` to report."""
    out = dict(dst)
    for k, v in src.items():
        if k in dst and v.shape != dst[k].shape and k.endswith("embeddings.position_embedding.weight"):
            n_src, n_dst = int(round((v.shape[0] - 1) ** 0.5)), int(round((dst[k].shape[0] - 1) ** 0.5))
            grid = v[1:].T.reshape(1, v.shape[1], n_src, n_src).float()
            grid = torch.nn.functional.interpolate(grid, size=(n_dst, n_dst), mode="bicubic", align_corners=False)
            out[k] = torch.cat([v[:1], grid.reshape(v.shape[1], -1).T.to(v.dtype)])
        else:
            out[k] = v  # same shape; or a key or shape load_state_dict will report
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except Exception:  # pragma: no cover - no git
        return ""


class Trainer:
    """Holds the model, MQT projector, aux heads and optimizer of a run; ``step(s)`` trains one step."""

    def __init__(self, cfg: RunConfig) -> None:
        base = variant(cfg.variant, **cfg.spec)
        recipe = dataclasses.replace(base.recipe, **cfg.recipe)
        self.cfg, self.recipe = cfg, recipe
        self.v: Variant = dataclasses.replace(base, recipe=recipe,
                                              spec=dataclasses.replace(base.spec, seed=recipe.seed))
        torch.manual_seed(recipe.seed)
        self.model, self.processor = build_model(self.v)
        if self.v.init_from or cfg.init:
            self._init_from(cfg.init)
        self.model.train()
        self.mqt = None
        if self.v.mqt_queries:
            from vtc.ops.mqt import MQTProjector

            torch.manual_seed(recipe.seed + 1)
            self.mqt = MQTProjector(self.v.spec.vision_hidden, self.v.spec.text_hidden, self.v.mqt_heads,
                                    self.v.mqt_queries)
            self.model.model.multi_modal_projector.requires_grad_(False)
        self.aux = AuxHeads(self.v.spec.vision_hidden) if recipe.aux_weight > 0 else None
        if recipe.freeze_tower:
            self.model.model.vision_tower.requires_grad_(False)
        decay, no_decay = [], []
        for mod in self.modules().values():
            for p in mod.parameters():
                if p.requires_grad:
                    (decay if p.dim() >= 2 else no_decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=recipe.lr, betas=(0.9, 0.98), eps=1e-8)
        self.step_no = 0
        self.elapsed = 0.0
        self.history: list[dict[str, float]] = []

    def _init_from(self, init: str | None) -> None:
        from vtc.models.tiny.assets import model_dir
        from vtc.models.tiny.loading import load

        src = Path(init) if init else model_dir(self.v.init_from)
        if not (src / "config.json").is_file():
            if init:
                raise ConfigError(f"--init {src}: no exported model there (no config.json); pass a folder written "
                                  "by the trainer (e.g. runs/NAME/final) or an assets/ folder")
            raise ConfigError(f"{self.v.name} starts from a trained {self.v.init_from}: nothing at {src}; train it "
                              f"first or pass --init FOLDER (e.g. runs/{self.v.init_from}/final)")
        sd = transfer_state(load(str(src)).model.state_dict(), self.model.state_dict())
        try:
            self.model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"--init {src}: its weights do not fit {self.v.name}: {e}") from None

    def modules(self) -> dict[str, torch.nn.Module]:
        mods: dict[str, torch.nn.Module] = {"model": self.model}
        if self.mqt is not None:
            mods["mqt"] = self.mqt
        if self.aux is not None:
            mods["aux"] = self.aux
        return mods

    def info(self) -> dict[str, Any]:
        return {"variant": self.v.name, "step": self.step_no, "steps": self.cfg.steps, "elapsed_s": self.elapsed,
                "recipe": dataclasses.asdict(self.recipe), "spec": dataclasses.asdict(self.v.spec),
                "mqt_queries": self.v.mqt_queries, "bf16": self.cfg.bf16, "threads": self.cfg.threads,
                "torch": torch.__version__, "commit": _git_commit(), "history": self.history[-200:]}

    def save(self) -> None:
        save_checkpoint(self.cfg.out, self.modules(), self.opt, self.info())

    def load(self) -> None:
        info = load_checkpoint(self.cfg.out, self.modules(), self.opt)
        if info["variant"] != self.v.name:
            raise ConfigError(f"{self.cfg.out} holds a {info['variant']} run, not {self.v.name}")
        self.step_no, self.elapsed = int(info["step"]), float(info["elapsed_s"])
        self.history = list(info.get("history", []))

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        r, s = self.recipe, self.step_no
        g = torch.Generator().manual_seed(r.seed * 1_000_003 + s)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(s, self.cfg.steps, r)
        b = train_batch(self.v, self.processor, s, r)
        u = torch.rand(3, generator=g)
        m = None
        if self.mqt is not None:
            from vtc.ops.mqt import sample_nested_m

            m = sample_nested_m(g, self.mqt.queries)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            if r.freeze_tower:
                with torch.no_grad():
                    from vtc.models.tiny.forward import tower

                    feats, cls = tower(self.model, b.pixel_values)
                x = self.mqt(feats, m) if self.mqt is not None else self.model.model.multi_modal_projector(feats)
                vis, valid = x, torch.ones(x.shape[:2], dtype=torch.bool)
            else:
                vo = encode_images(self.model, b.pixel_values, b.image_sizes, mqt=self.mqt, m=m)
                vis, valid, feats, cls = vo.tokens, vo.valid, vo.patches, vo.cls
            n_full = valid.sum(1)
            vis_pos = None
            kept = int(n_full.max())
            if self.mqt is None and float(u[0]) < r.prune_share:
                N = int(n_full.max())
                lo = min(r.prune_min, N)
                k = int(round(math.exp(math.log(lo) + float(u[1]) * (math.log(N) - math.log(lo)))))
                idx, ok = random_subset(valid, k, g)
                vis = vis.gather(1, idx.unsqueeze(-1).expand(-1, -1, vis.shape[-1]))
                valid = ok
                kept = k
                if float(u[2]) < r.original_positions_share:
                    vis_pos = idx
            inputs, pos, start = assemble(self.model, b.prefix, vis, valid, b.suffix, b.lengths,
                                          vis_pos=vis_pos, n_full=n_full)
            hidden = lm_hidden(self.model, inputs, pos)
            lm_loss = loss_and_logits(self.model, hidden, start, b.suffix, b.target)
            loss = lm_loss
            aux_loss = torch.zeros(())
            if self.aux is not None and b.aux is not None and bool(b.aux_views.any()):
                sel = b.aux_views
                aux_loss = self.aux.loss(feats[sel], cls[sel], b.aux)
                loss = loss + r.aux_weight * aux_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for grp in self.opt.param_groups for p in grp["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, r.clip)
        self.opt.step()
        self.step_no += 1
        return {"step": s, "loss": float(lm_loss.detach()), "aux": float(aux_loss.detach()), "kept": kept, "m": m or 0,
                "lr": self.opt.param_groups[0]["lr"], "gnorm": float(gnorm)}

    # ------------------------------------------------------------------ export
    def export(self, dest: str | Path) -> Path:
        self.model.eval()
        info = {k: v for k, v in self.info().items() if k != "history"}
        info["final_loss"] = self.history[-1]["loss"] if self.history else None
        return export_folder(dest, self.model, self.processor, self.mqt, info)


def _print(cfg: RunConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, flush=True)


def train(cfg: RunConfig) -> Trainer:
    """Run (or continue) a training run until ``cfg.steps`` or the time limit; see the module docstring."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t = Trainer(cfg)
    out = Path(cfg.out)
    if cfg.resume and (out / CKPT_JSON).is_file():
        t.load()
        _print(cfg, f"resumed {t.v.name} from {out} at step {t.step_no}")
    elif (out / CKPT_JSON).is_file() and not cfg.resume:
        raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    n_params = sum(p.numel() for p in t.model.parameters())
    _print(cfg, f"{t.v.name}: {n_params / 1e6:.2f}M parameters, batch {t.recipe.batch} images x {t.recipe.turns} "
                f"turns, steps {t.step_no}->{cfg.steps}, threads {torch.get_num_threads()}, bf16 {cfg.bf16}")
    chunk_start = time.time()
    window: list[dict[str, float]] = []
    win_t = time.time()
    stopped_early = False
    while t.step_no < cfg.steps:
        t0 = time.time()
        rec = t.step()
        t.elapsed += time.time() - t0
        window.append(rec)
        if t.step_no % cfg.log_every == 0 or t.step_no == cfg.steps:
            dt = time.time() - win_t
            avg = {k: sum(w[k] for w in window) / len(window) for k in ("loss", "aux", "kept", "gnorm")}
            rate = len(window) * t.recipe.batch / max(dt, 1e-9)
            t.history.append({"step": t.step_no, "loss": avg["loss"], "aux": avg["aux"], "images_per_s": rate})
            _print(cfg, f"step {t.step_no:6d}  loss {avg['loss']:.4f}  aux {avg['aux']:.3f}  lr {rec['lr']:.2e}  "
                        f"tokens~{avg['kept']:.0f}  gnorm {avg['gnorm']:.2f}  {rate:.1f} img/s  "
                        f"elapsed {t.elapsed / 60:.1f} min")
            window, win_t = [], time.time()
        if t.step_no % cfg.save_every == 0:
            t.save()
        if cfg.max_minutes is not None and time.time() - chunk_start > cfg.max_minutes * 60 and t.step_no < cfg.steps:
            stopped_early = True
            break
    t.save()
    if stopped_early:
        _print(cfg, f"time limit: stopped at step {t.step_no}/{cfg.steps}; continue with --resume")
    elif cfg.export:
        dest = t.export(out / "final")
        _print(cfg, f"done: exported {dest} (copy it to assets/{t.v.name})")
    (out / "run.json").write_text(json.dumps({"argv": sys.argv, "config": dataclasses.asdict(cfg)}, indent=1))
    return t
