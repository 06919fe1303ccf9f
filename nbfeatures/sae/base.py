"""What every dictionary shares: the `Dictionary` contract, sparse kernels, decoder-norm helpers, init.

Any dictionary (TopK SAE, ReLU SAE, binary autoencoder, ...) has `encode(x) -> latents [N, F]`,
`decode(latents) -> x_hat [N, D]` and `forward(x)` returning a NamedTuple whose first field is `x_hat`,
so the site layer can splice any of them; `architecture` names it in files, its config is a frozen
dataclass, and `default_objective()` is what `train_sae` optimises when no objective is passed.
Adding one: a file in `sae/` with its config, module and objective, and `register_architecture(...)`.

Sparse kernels (cost grows with K, not F):
    gather_pre(x, W_enc, b_enc, idx, pre)  = pre[n, idx[n, j]]  whose backward touches only the K chosen columns
    sparse_decode(acts, idx, W_dec)        = sum_j acts[n, j] W_dec[idx[n, j]]   (an embedding bag)
    chosen_pre(x, b_dec, W_enc, b_enc, idx, vals)  as gather_pre, for values found without an [N, F] pre (blocked.py)
    span_decode(acts, idx, W_dec, spans)   sparse decodes of column spans of idx (x_hat and AuxK's e_hat) with one
                                           backward that visits the entries sorted by latent
Encoders that never hold the [N, F] pre-activations (blocked_topk, ...) are in blocked.py.

Dimension key: N tokens, D input dim, F latents, K active latents.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import int_arg


@runtime_checkable
class Dictionary(Protocol):
    """The contract every dictionary obeys (see the module docstring)."""

    architecture: ClassVar[str]  # its name in cfg.json
    cfg: Any  # a frozen dataclass with d_in and d_sae

    def forward(self, x: Tensor) -> tuple: ...  # a NamedTuple whose first field is x_hat

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def config_dict(self) -> dict: ...

    def default_objective(self) -> Any: ...


class DictionaryModule(nn.Module):
    """Shared plumbing: the config as a dict comes from the dataclass itself."""

    cfg: Any

    def config_dict(self) -> dict:
        return asdict(self.cfg)


class _GatherPre(torch.autograd.Function):
    """out[n, j] = x[n] . W_enc[:, idx[n, j]] + b_enc[idx[n, j]], reusing the dense `pre` for the value.

    The backward is sparse: grad W_enc[:, f] = sum over (n, j) with idx[n, j] = f of g[n, j] x[n],
    a [F, N] sparse by [N, D] dense product, instead of the dense x^T grad_pre of autograd.
    """

    @staticmethod
    def forward(ctx, x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, idx_NK: Tensor, pre_NF: Tensor) -> Tensor:
        ctx.save_for_backward(x_ND, W_enc_DF, idx_NK)
        return pre_NF.gather(1, idx_NK)

    @staticmethod
    def backward(ctx, g_NK: Tensor):
        x_ND, W_enc_DF, idx_NK = ctx.saved_tensors
        N, K = idx_NK.shape
        F_ = W_enc_DF.shape[1]
        g_NK = g_NK.contiguous()
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx_NK, W_enc_DF.t().contiguous(), per_sample_weights=g_NK, mode="sum")
        if ctx.needs_input_grad[1]:
            rows = torch.arange(N, device=idx_NK.device).repeat_interleave(K)
            G_FN = torch.sparse_coo_tensor(
                torch.stack([idx_NK.reshape(-1), rows]), g_NK.reshape(-1), (F_, N), check_invariants=False
            ).coalesce()
            grad_W = torch.sparse.mm(G_FN, x_ND).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(F_, dtype=g_NK.dtype, device=g_NK.device).index_add_(0, idx_NK.reshape(-1), g_NK.reshape(-1))
        return grad_x, grad_W, grad_b, None, None


def gather_pre(x_ND: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, idx_NK: Tensor, pre_NF: Tensor) -> Tensor:
    """The pre-activations at the chosen latents, differentiable with a sparse backward."""
    return _GatherPre.apply(x_ND, W_enc_DF, b_enc_F, idx_NK, pre_NF)


def _by_latent(ids_M: Tensor, n_latents: int) -> tuple[Tensor, Tensor]:
    """(order, starts [F]): the entries sorted by latent (stably) and where each latent's run begins."""
    counts = torch.bincount(ids_M, minlength=n_latents)
    return ids_M.argsort(stable=True), counts.cumsum(0) - counts


def _sum_by_latent(rows_M: Tensor, w_M: Tensor, ids_M: Tensor, dense_RD: Tensor, like_DF: Tensor) -> Tensor:
    """[D, F] in like's layout: column f = sum of w[m] dense[rows[m]] over the entries m with ids[m] = f. One embedding
    bag per latent (the transpose of a sparse decode: what a sparse [F, R] @ dense [R, D] product does, several times
    faster), for a row-major like written transposed 4096 latents at a time (no [F, D] temporary)."""
    (D, F_), M = like_DF.shape, len(ids_M)
    order, starts = _by_latent(ids_M, F_)
    rows_M, w_M = rows_M[order], w_M[order]
    if like_DF.stride(0) == 1:  # [F, D] row-major underneath: the bags' output is the gradient as it is
        return F.embedding_bag(rows_M, dense_RD, starts, per_sample_weights=w_M, mode="sum").t()
    out_DF = dense_RD.new_empty(D, F_)
    bounds = torch.cat([starts[::4096], starts.new_tensor([M])]).tolist()
    for f, (a, b) in zip(range(0, F_, 4096), zip(bounds, bounds[1:])):
        chunk = F.embedding_bag(rows_M[a:b], dense_RD, starts[f : f + 4096] - a, per_sample_weights=w_M[a:b], mode="sum")
        out_DF[:, f : f + 4096] = chunk.t()
    return out_DF


class _ChosenPre(torch.autograd.Function):
    """out = (x - b_dec) . W_enc[:, idx] + b_enc[idx] whose values `vals` are already known (found tile by tile in
    blocked.py, without the [N, F] pre).
    The backward is sparse, as _GatherPre's: W_enc's gradient sums g x over each latent's entries (an embedding bag
    per latent), b_dec's is -W_enc grad_b_enc (a GEMV)."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, b_dec_D: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, idx_NK: Tensor, vals_NK: Tensor):
        ctx.save_for_backward(x_ND - b_dec_D, W_enc_DF, idx_NK)
        return vals_NK.clone()

    @staticmethod
    def backward(ctx, g_NK: Tensor):
        xc_ND, W_enc_DF, idx_NK = ctx.saved_tensors
        need_x, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[:4]
        K, F_ = idx_NK.shape[1], W_enc_DF.shape[1]
        g_M, ids_M = g_NK.reshape(-1).to(xc_ND.dtype), idx_NK.reshape(-1)
        grad_x = grad_b_dec = grad_W = grad_b_enc = None
        if need_b_enc or need_b_dec:
            grad_b_enc = torch.zeros(F_, dtype=g_M.dtype, device=g_M.device).index_add_(0, ids_M, g_M)
        if need_x:
            grad_x = F.embedding_bag(idx_NK, W_enc_DF.t().contiguous(), per_sample_weights=g_NK.contiguous(), mode="sum")
        if need_b_dec:
            grad_b_dec = -(W_enc_DF @ grad_b_enc)
        if need_W:
            rows_M = torch.arange(len(ids_M), device=ids_M.device).div_(K, rounding_mode="floor")
            grad_W = _sum_by_latent(rows_M, g_M, ids_M, xc_ND, W_enc_DF)  # in W_enc's layout: autograd keeps it as is
        return grad_x, grad_b_dec, grad_W, grad_b_enc if need_b_enc else None, None, None


def chosen_pre(x_ND: Tensor, b_dec_D: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, idx_NK: Tensor, vals_NK: Tensor) -> Tensor:
    """The pre-activations `vals` [N, K] at latents `idx`, differentiable with a sparse backward (no [N, F] needed)."""
    return _ChosenPre.apply(x_ND, b_dec_D, W_enc_DF, b_enc_F, idx_NK, vals_NK)


class _SpanDecode(torch.autograd.Function):
    """out[s][n] = sum_{a_s <= j < b_s} acts[n, j] W_dec[idx[n, j]]: several decodes of column spans of one set of
    chosen latents (TopK's x_hat, Multi-TopK's, AuxK's e_hat) with one backward that sorts the entries by latent
    once: W_dec's gradient is an embedding bag per latent, acts' a sampled product W_dec g^T that reads each decoder
    row once (a plain embedding bag's backward reads it once per entry, and writes its gradient densely per entry)."""

    @staticmethod
    def forward(ctx, acts_NK: Tensor, idx_NK: Tensor, W_dec_FD: Tensor, spans: tuple[tuple[int, int], ...]):
        ctx.save_for_backward(acts_NK, idx_NK, W_dec_FD)
        ctx.spans = spans
        w_NK = acts_NK.to(W_dec_FD.dtype)
        N, D = idx_NK.shape[0], W_dec_FD.shape[1]
        return tuple(F.embedding_bag(idx_NK[:, a:b], W_dec_FD, per_sample_weights=w_NK[:, a:b], mode="sum") if b > a
                     else W_dec_FD.new_zeros(N, D) for a, b in spans)  # fmt: skip

    @staticmethod
    def backward(ctx, *g_SND: Tensor):
        acts_NK, idx_NK, W_dec_FD = ctx.saved_tensors
        (N, K), (F_, D) = idx_NK.shape, W_dec_FD.shape
        dev = idx_NK.device
        dtype, tokens = W_dec_FD.dtype, torch.arange(N, device=dev)
        g_RD = torch.cat([torch.zeros(N, D, dtype=dtype, device=dev) if g is None else g.to(dtype) for g in g_SND])
        # one entry per (span, token, column): its flat position in [N, K] and its row s N + n in g_RD
        pos_M = torch.cat([(tokens[:, None] * K + torch.arange(a, b, device=dev)).reshape(-1) for a, b in ctx.spans])
        rows_M = torch.cat([(s * N + tokens).repeat_interleave(b - a) for s, (a, b) in enumerate(ctx.spans)])
        ids_M, w_M = idx_NK.reshape(-1)[pos_M], acts_NK.reshape(-1).to(dtype)[pos_M]
        order, starts = _by_latent(ids_M, F_)
        grad_acts = grad_W = None
        if ctx.needs_input_grad[2]:
            grad_W = F.embedding_bag(rows_M[order], g_RD, starts, per_sample_weights=w_M[order], mode="sum")
        if ctx.needs_input_grad[0]:
            crow = torch.cat([starts, starts.new_tensor([len(ids_M)])])
            wide = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # sampled_addmm has no half kernels
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                pattern = torch.sparse_csr_tensor(crow, rows_M[order], torch.zeros(len(ids_M), dtype=wide, device=dev),
                                                  (F_, len(g_RD)), check_invariants=False)  # fmt: skip
            dots = torch.sparse.sampled_addmm(pattern, W_dec_FD.to(wide), g_RD.t().to(wide), beta=0).values()  # W_dec[ids] . g[rows]
            grad_acts = torch.zeros(N * K, dtype=dots.dtype, device=dev).index_add_(0, pos_M[order], dots)
            grad_acts = grad_acts.view(N, K).to(acts_NK.dtype)
        return grad_acts, None, grad_W, None


def span_decode(acts_NK: Tensor, idx_NK: Tensor, W_dec_FD: Tensor, spans: list[tuple[int, int]]) -> tuple[Tensor, ...]:
    """One sparse decode [N, D] (no b_dec) per column span (a, b) of acts/idx, sharing one fast sparse backward."""
    return _SpanDecode.apply(acts_NK, idx_NK, W_dec_FD, tuple(spans))


def sparse_decode(acts_NK: Tensor, idx_NK: Tensor, W_dec_FD: Tensor) -> Tensor:
    """sum_j acts[n, j] W_dec[idx[n, j]]: only the K active decoder rows are read (and get gradients)."""
    return F.embedding_bag(idx_NK, W_dec_FD, per_sample_weights=acts_NK.to(W_dec_FD.dtype), mode="sum")


def dense_from_sparse(acts_NK: Tensor, idx_NK: Tensor, n_latents: int) -> Tensor:
    """[N, K] values at [N, K] indices -> dense [N, F]."""
    return torch.zeros(acts_NK.shape[0], n_latents, dtype=acts_NK.dtype, device=acts_NK.device).scatter_(1, idx_NK, acts_NK)


def tied_unit_init(d_in: int, d_sae: int, seed: int | None = 0) -> tuple[Tensor, Tensor]:
    """(W_enc [D, F], W_dec [F, D]): random unit decoder rows, the encoder their transpose ("tied", Gao et al.), stored
    row-major as a loaded W_enc is (a transposed view would make fused Adam copy it to contiguous and back on every
    step: ~40 ms at d_sae 32768 on 2 CPU threads)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return W_dec.t().contiguous(), W_dec


@torch.no_grad()
def unit_norm_rows_(W_FD: Tensor) -> None:
    W_FD.div_(W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def remove_parallel_grad_(W_FD: Tensor) -> None:
    """Drop the gradient component along each (unit) decoder row, so a step moves it on the sphere."""
    if W_FD.grad is not None:
        W_FD.grad.sub_((W_FD.grad * W_FD).sum(dim=1, keepdim=True) * W_FD)


@torch.no_grad()
def remove_parallel_grad_lowmem_(W_FD: Tensor) -> None:
    """remove_parallel_grad_ with no [F, D] temporary: a row-wise dot, then one fused multiply-subtract in place."""
    if W_FD.grad is not None:
        W_FD.grad.addcmul_(torch.einsum("fd,fd->f", W_FD.grad, W_FD).unsqueeze(1), W_FD, value=-1)


@torch.no_grad()
def geometric_median(x_ND: Tensor, iters: int = 100, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows."""
    x_ND = x_ND.double()
    m = x_ND.mean(0)
    for _ in range(iters):
        w = 1.0 / (x_ND - m).norm(dim=1).clamp_min(eps)
        m_next = (w[:, None] * x_ND).sum(0) / w.sum()
        if (m_next - m).norm() < 1e-7 * m.norm().clamp_min(1.0):
            m = m_next
            break
        m = m_next
    return m.float()


def check_input(name: str, x: Tensor, d_in: int, dtype: torch.dtype) -> Tensor:
    """Flatten leading dims; reject a wrong width, non-float dtype or non-finite values by name."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: input must be a Tensor, got {type(x).__name__}")
    if x.shape[-1] != d_in:
        raise ValueError(f"{name}: input has width {x.shape[-1]} (shape {list(x.shape)}), expected d_in={d_in}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: input dtype {x.dtype} is not floating point")
    return x.reshape(-1, d_in).to(dtype)


class UnitNormSAE(DictionaryModule):
    """What the TopK and ReLU SAEs share: SAELens-layout parameters W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D]
    (W_enc registered first), the tied unit-norm init, b_dec from the geometric median, the dense decode, and the
    training hooks that keep decoder rows unit-norm (the gradient along each row removed before the step, rows
    renormalised after it)."""

    config_class: ClassVar[type]  # the subclass's config dataclass

    def __init__(self, cfg: Any, seed: int | None = 0):
        name = type(self).__name__
        if not isinstance(cfg, self.config_class):
            raise ValueError(f"{name}: cfg must be a {self.config_class.__name__}, got {type(cfg).__name__}")
        if seed is not None:
            int_arg(name, "seed", seed, minimum=0)
        super().__init__()
        W_enc, W_dec = tied_unit_init(cfg.d_in, cfg.d_sae, seed)
        self.W_enc, self.W_dec = nn.Parameter(W_enc), nn.Parameter(W_dec)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.cfg = cfg

    @torch.no_grad()
    def init_b_dec_(self, sample_ND: Tensor) -> None:
        """b_dec = geometric median of a sample of activations (Gao et al.)."""
        self.b_dec.copy_(geometric_median(check_input("init_b_dec_", sample_ND, self.W_enc.shape[0], torch.float32)))

    def decode(self, latents: Tensor) -> Tensor:
        """Dense latents [..., F] -> x_hat [..., D] (the obvious, dense decode)."""
        return latents @ self.W_dec + self.b_dec

    # training hooks the shared loop calls around each optimiser step
    def before_step_(self) -> None:
        remove_parallel_grad_lowmem_(self.W_dec)

    def after_step_(self) -> None:
        unit_norm_rows_(self.W_dec)


class FiringTracker:
    """Tokens since each latent last fired; a latent is dead once that reaches `dead_tokens`."""

    def __init__(self, n_latents: int, dead_tokens: int):
        if dead_tokens <= 0:
            raise ValueError(f"dead_tokens must be > 0, got {dead_tokens}")
        self.dead_tokens = dead_tokens
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.long)

    @torch.no_grad()
    def update(self, fired_F: Tensor, n_tokens: int) -> Tensor:
        """Record one batch (fired_F: bool [F]); return the dead mask [F]."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired_F.cpu()] = 0
        return self.tokens_since_fired >= self.dead_tokens

    def dying(self, n_tokens: int) -> Tensor:
        """The latents a batch of n_tokens leaves dead unless they fire in it (update's dead mask is a subset)."""
        return self.tokens_since_fired + n_tokens >= self.dead_tokens

    def state_dict(self) -> dict[str, Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.tokens_since_fired = state["tokens_since_fired"].clone().long()


def fvu(x_hat: Tensor, x: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum (x_hat - x)^2 / sum (x - mean x)^2 over the batch."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def auxk_loss(sae: UnitNormSAE, x_ND: Tensor, x_hat_ND: Tensor, pre_NF: Tensor, dead_F: Tensor, k_aux: int) -> Tensor:
    """AuxK (Gao et al.): FVU of the detached residual x - x_hat against its decode (no b_dec: the residual has none)
    from each token's top k_aux dead latents; only those latents' encoder columns and decoder rows get gradients."""
    k_aux = min(k_aux, int(dead_F.sum()))
    idx_NK = pre_NF.masked_fill(~dead_F.to(pre_NF.device), float("-inf")).topk(k_aux, dim=1).indices
    vals_NK = torch.relu(gather_pre(x_ND - sae.b_dec, sae.W_enc, sae.b_enc, idx_NK, pre_NF))
    return fvu(sparse_decode(vals_NK, idx_NK, sae.W_dec), (x_ND - x_hat_ND).detach())
