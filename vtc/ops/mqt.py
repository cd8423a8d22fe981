"""MQT: the Matryoshka Query Transformer projector, a trained operator that replaces LLaVA's projector.

Paper: "Matryoshka Query Transformer for Large Vision-Language Models" (Hu, Dou, Li, Kamath,
Peng, Chang; NeurIPS 2024). Described in methods.md §5a; written from that description.

``mqt:keep=m`` maps the vision tower's patch features ``[B, N, D]`` (stage ``vision``) straight
to ``m`` LLM embeddings ``[B, m, out_dim]`` with one cross-attention layer, so an integration runs
it *instead of* the model's projector (``replaces_projector``). With ``M`` learned queries ``Q``
and a fixed 2D sin-cos table ``pe`` on a ``sqrt(M) x sqrt(M)`` grid::

    q   = LN_q(Q[:m] + pe[:m])           # the first m queries, raster order of the query grid
    k   = LN_k(bicubic(pe -> h x w)[i])  # official quirk: keys are positional only (no image content)
    v   = LN_v(x)
    out = MultiheadAttention(q, k, v) @ W    # W: D x out_dim, no bias; no post-LN, no MLP

``i`` is each token's original position in its ``h x w`` grid (from ``layout``, else a square of
all tokens), so tokens pruned by an earlier vision-stage operator are simply absent keys. Because
keys carry no image content, each query is a fixed learned pooling of ``LN(x)``: this is what the
released MQT-LLaVA does (only ``compat="official"`` exists; a content-keyed variant would need its
own training). Trained with nested-dropout sampling of ``m`` (uniform over even ``2..M`` per step)
the first ``m`` queries serve any budget ``m <= M``.

Defaults: ``keep`` = all ``M`` queries; ``weights="tiny-mqt"``, the embedded model's trained
projector (``assets/tiny-mqt/mqt.safetensors``); ``weights=`` also takes a ``.safetensors`` path
or a folder holding ``mqt.safetensors``; ``weights=none`` with ``dim``, ``out_dim``, ``heads`` and
``queries`` builds a randomly initialised projector (to train). Weights load on first use.
Output tokens: ``index = 0..m-1`` (query ids), ``size = n/m`` (the ``n`` input tokens shared
equally), no group, layout or signals. MQT works on one partition per image (LLaVA-1.5).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtc.errors import BudgetError, ConfigError, LayoutError
from vtc.ops.base import OpConfig, Operator
from vtc.registry import register
from vtc.tokens import VisualTokens

__all__ = ["MQTConfig", "MQT", "MQTProjector", "sincos_2d", "sample_nested_m", "WEIGHTS_FILE"]

WEIGHTS_FILE = "mqt.safetensors"


def sincos_2d(dim: int, h: int, w: int) -> Tensor:
    """``[h*w, dim]`` fixed 2D sin-cos embedding (MAE convention: first half of the channels
    encode the column, second half the row; each half is ``[sin, cos]`` of ``pos / 10000^(j/(dim/4))``)."""
    if dim % 4:
        raise ConfigError(f"mqt: the feature width must be divisible by 4 for the 2D sin-cos embedding, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)

    def enc(p: Tensor) -> Tensor:
        a = p[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], 1)

    return torch.cat([enc(cols), enc(rows)], 1).float()


def sample_nested_m(generator: torch.Generator | None, queries: int) -> int:
    """MQT's nested-dropout query count: uniform over the even numbers ``2..queries`` (1 if queries == 1)."""
    if queries < 2:
        return 1
    return 2 * (int(torch.randint(1, queries // 2 + 1, (1,), generator=generator)))


class MQTProjector(nn.Module):
    """The trainable MQT module (see the module docstring): ``forward(x, m) -> [B, m, out_dim]``."""

    def __init__(self, dim: int, out_dim: int, heads: int, queries: int = 256) -> None:
        super().__init__()
        side = math.isqrt(queries)
        if side * side != queries:
            raise ConfigError(f"mqt: queries must be a square number (a side x side grid), got {queries}")
        if dim % heads:
            raise ConfigError(f"mqt: dim={dim} is not divisible by heads={heads}")
        self.dim, self.out_dim, self.heads, self.queries, self.side = dim, out_dim, heads, queries, side
        self.query = nn.Parameter(torch.empty(queries, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.register_buffer("pos", sincos_2d(dim, side, side), persistent=False)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_k = nn.LayerNorm(dim, eps=1e-6)
        self.ln_v = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Parameter(out_dim ** -0.5 * torch.randn(dim, out_dim))

    def key_pos(self, h: int, w: int) -> Tensor:
        """``[h*w, dim]``: the query table resized bicubically to the ``h x w`` patch grid (get_abs_pos)."""
        if (h, w) == (self.side, self.side):
            return self.pos
        t = self.pos.reshape(1, self.side, self.side, self.dim).permute(0, 3, 1, 2)
        t = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        t = F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)
        return t.permute(0, 2, 3, 1).reshape(h * w, self.dim).to(self.pos.dtype)

    def forward(self, x: Tensor, m: int | None = None, *, grid: tuple[int, int] | None = None,
                index: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """``x [B, N, dim]`` patch features -> ``[B, m, out_dim]``.

        ``grid``: the patch grid ``(h, w)`` (default: square of N); ``index [B, N]``: each token's
        raster position in that grid (default ``0..N-1``); ``valid [B, N]``: which tokens are real.
        """
        B, N, D = x.shape
        m = self.queries if m is None else int(m)
        if not 1 <= m <= self.queries:
            raise BudgetError(f"mqt: keep must be between 1 and its {self.queries} queries, got {m}")
        if grid is None:
            side = math.isqrt(N)
            if side * side != N:
                raise LayoutError(f"mqt: {N} tokens are not a square grid; pass the grid (a Layout)")
            grid = (side, side)
        kpos = self.key_pos(*grid)
        q = self.ln_q(self.query[:m] + self.pos[:m]).unsqueeze(1).expand(m, B, D)
        if index is None:
            k = self.ln_k(kpos).unsqueeze(1).expand(N, B, D)
        else:
            k = self.ln_k(kpos[index.clamp(0, kpos.shape[0] - 1)]).transpose(0, 1)
        v = self.ln_v(x).transpose(0, 1)
        pad = None if valid is None or bool(valid.all()) else ~valid
        out = self.attn(q, k, v, key_padding_mask=pad, need_weights=False)[0]
        return out.transpose(0, 1) @ self.proj

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, str]:
        return {"format": "vtc-mqt", "dim": str(self.dim), "out_dim": str(self.out_dim),
                "heads": str(self.heads), "queries": str(self.queries)}

    def save(self, path: str | os.PathLike, extra: dict[str, str] | None = None) -> None:
        """Write the trained parameters (fp32) and the shape metadata to a ``.safetensors`` file."""
        from safetensors.torch import save_file

        sd = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, str(path), metadata={**self.metadata(), **(extra or {})})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> MQTProjector:
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            raise ConfigError(f"mqt: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
        if meta.get("format") != "vtc-mqt":
            raise ConfigError(f"mqt: {path} is not an MQT weights file written by vtc (no 'vtc-mqt' metadata)")
        mod = cls(int(meta["dim"]), int(meta["out_dim"]), int(meta["heads"]), int(meta["queries"]))
        mod.load_state_dict(load_file(str(path)))
        return mod


def _is_name(weights: str) -> bool:
    """``weights`` names an embedded model (``tiny-mqt``), not a path."""
    p = Path(weights)
    return not (os.sep in weights or "/" in weights or p.suffix or p.exists())


def resolve_weights(weights: str) -> Path:
    """The ``.safetensors`` file ``weights`` names: a ``.safetensors`` file, a folder holding
    ``mqt.safetensors``, or the name of an embedded model in vtc's assets.

    Weights are read from safetensors files only (a pickled checkpoint can run code), and a
    relative path may not leave the working folder (``weights=../../etc/passwd`` is refused; give
    an absolute path to use a file elsewhere): a pipeline spec in a config someone else wrote
    cannot make vtc read an arbitrary file. Raises :class:`~vtc.errors.ConfigError`.
    """
    if _is_name(weights):
        from vtc.models.tiny.assets import asset_dir

        return asset_dir() / weights / WEIGHTS_FILE
    p = Path(weights).expanduser()
    if not p.is_absolute():
        here = os.path.abspath(os.curdir)
        if os.path.commonpath([os.path.normpath(os.path.join(here, p)), here]) != here:
            raise ConfigError(f"mqt: weights={weights!r} leaves the working folder; give an absolute path to the "
                              ".safetensors file if you mean a file elsewhere")
    if p.is_dir():
        p = p / WEIGHTS_FILE
    if p.suffix != ".safetensors":
        raise ConfigError(f"mqt: weights={weights!r} is not a .safetensors file; vtc reads weights from safetensors "
                          "files only (a .safetensors file, a folder holding mqt.safetensors, or an embedded model's name)")
    return p


@dataclass
class MQTConfig(OpConfig):
    """``keep``: queries used (the first ``keep``; default all). ``weights``: see the module docstring.
    ``dim``/``out_dim``/``heads``/``queries``: shapes of a fresh projector (``weights=none``)."""

    keep: int | None = None
    weights: str | None = "tiny-mqt"
    dim: int | None = None
    out_dim: int | None = None
    heads: int | None = None
    queries: int | None = None
    compat: Literal["official"] = "official"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep is not None and self.keep <= 0:
            raise BudgetError(f"mqt keep must be a positive number of queries, got keep={self.keep}")
        shapes = (self.dim, self.out_dim, self.heads, self.queries)
        if self.weights is None and any(v is None for v in shapes):
            raise ConfigError("mqt with weights=none builds a fresh projector: give dim, out_dim, heads and queries")
        if self.weights is not None and any(v is not None for v in shapes):
            raise ConfigError("mqt: dim/out_dim/heads/queries describe a fresh projector (weights=none); "
                              "with weights= the shapes come from the file")
        if self.weights is not None:
            path = resolve_weights(self.weights)  # a path that is not a safetensors file fails here
            if not _is_name(self.weights) and not path.is_file():
                raise ConfigError(f"mqt: no weights file at {path}")


@register("mqt")
class MQT(Operator):
    Config = MQTConfig
    default_stage = "vision"
    replaces_projector = True

    def __init__(self, config: MQTConfig | None = None, /, **kwargs) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        self.projector: MQTProjector | None = None
        if cfg.weights is None:
            self.projector = MQTProjector(cfg.dim, cfg.out_dim, cfg.heads, cfg.queries)
            self._check_keep()

    def _check_keep(self) -> None:
        k = self.config.keep
        if k is not None and k > self.projector.queries:
            raise BudgetError(f"mqt keep={k} exceeds the projector's {self.projector.queries} queries")

    def load(self) -> MQTProjector:
        """Load the weights now (they otherwise load on the first forward); returns the projector."""
        if self.projector is None:
            path = resolve_weights(self.config.weights)
            if not path.is_file():
                raise ConfigError(
                    f"mqt: weights {self.config.weights!r} not found (looked for {path}); train them with "
                    "`python -m vtc.models.tiny train --variant tiny-mqt` or pass weights=PATH"
                )
            self.projector = MQTProjector.from_file(path)
            self._check_keep()
        return self.projector

    def forward(self, tokens: VisualTokens) -> VisualTokens:
        tokens.check_finite("operator 'mqt'")
        proj = self.load()
        p = next(proj.parameters())
        if p.device != tokens.device:
            proj.to(tokens.device)
        if tokens.dim != proj.dim:
            raise ConfigError(f"mqt: its projector takes {proj.dim}-d features but the tokens are {tokens.dim}-d")
        layouts = tokens.layouts()
        grids = {lay.grids[0] for lay in layouts if lay is not None}
        if any(lay is not None and lay.num_partitions > 1 for lay in layouts) or (
                tokens.group is not None and bool((tokens.group[tokens.valid] != 0).any())):
            raise LayoutError("mqt works on one partition per image (LLaVA-1.5), not on AnyRes crops")
        if len(grids) > 1:
            raise LayoutError(f"mqt: the images of a batch come from different grids {sorted(grids)}")
        grid = grids.pop() if grids else None
        if grid is None:
            n = int(tokens.index.max()) + 1 if tokens.index.numel() else tokens.num_tokens
            side = math.isqrt(max(n, tokens.num_tokens))
            if side * side != max(n, tokens.num_tokens):
                raise LayoutError(f"mqt: {n} tokens are not a square grid; give the tokens a Layout")
            grid = (side, side)
        m = self.config.keep or proj.queries
        x = proj(tokens.x.to(p.dtype), m, grid=grid, index=tokens.index, valid=tokens.valid)
        B = tokens.batch_size
        size = (tokens.counts.to(x.dtype) / m).unsqueeze(1).expand(B, m)
        return VisualTokens(x=x, index=torch.arange(m, device=x.device).expand(B, m), size=size.contiguous())
