"""Exact per-sample gradient clipping of both adaptors in one forward and one backward pass.

DP-SGD needs, for every sample i of a batch, the norm of its gradient g_i over all adaptor parameters, then
Σ_i min(1, C/(‖g_i‖ + 1e-6))·g_i (opacus' flat clipping; opacus then adds the noise). Nothing of size
batch × parameters is built, and the gradients are summed from per-sample factors ("book-keeping"):

- Image adaptor: each Linear sees one input row x_i per sample, so with its output gradient e_i (from one
  backward pass over activations only) ‖g_i‖² = ‖e_i‖²·(‖x_i‖² + 1), and the clipped sum is (clip ⊙ e)ᵀ·[x, 1].
- LoRA in the image tower (``lora``/``both`` kinds): each sample's embedding depends on its own image only, so
  backpropagating the per-sample gradients of the embeddings (rows of dL/d emb) through the tower gives, in opacus'
  grad-sample hooks (:class:`opacus.GradSampleModule` on the tower's LoRA layers), each sample's gradient of the
  LoRA matrices exactly; their squared norms join the adaptors' before clipping.
- Text adaptor: all samples share its R prompt rows, so it runs once per batch. Sample i's loss sees it only
  through the disease means M = A·text [2C, d] (A averages the prompts), and dL_i/dM has a closed form: row k is
  a_ik·(img_i − cos_ik·n_k), with n_k = M_k/‖M_k‖ and a_ik = ±s·(dL_i/dlogit of disease k // 2)/‖M_k‖. Through
  the adaptor's shared activations, sample i's gradient at output row r of a Linear is then
  m_r ⊙ Σ_k A_kr·a_ik·(v_i − cos_ik·w_k), with v_i = img_i (or img_i·W above it), w_k = n_k (or n_k·W) and m the
  ReLU mask after it, if any: its squared norm is a quadratic form in per-sample factors over small Grams of the
  shared rows, and the clipped sum a few small matrix products.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from client.trainer import Prompts
from shared.errors import RetuneError
from shared.model import RetuneModel, masked_bce

Call = tuple[nn.Linear, torch.Tensor, torch.Tensor]  # a Linear, its input and its output


class PerSampleRetune(nn.Module):
    """:class:`RetuneModel`'s adaptors and score with the prompts bound, and :meth:`clipped_backward` for DP-SGD."""

    def __init__(self, model: RetuneModel, prompts: Prompts) -> None:
        super().__init__()
        if model.text_tower is not None:
            raise RetuneError("DP-SGD with LoRA in the text tower is not supported: every sample's loss goes through "
                              "all the prompts, so its per-sample gradients would need one text-tower pass per "
                              "sample; use --lora-towers image (or no DP)")
        tower = model.image_tower or nn.Module()
        wrapped = [n for n, m in tower.named_modules() if isinstance(getattr(m, "base_layer", None), nn.MultiheadAttention)]
        if wrapped:
            raise RetuneError(f"DP-SGD needs LoRA on Linear projections, but {wrapped[0]} is a MultiheadAttention, "
                              "whose LoRA layers opacus cannot see per sample: train it without DP")
        self.image_adaptor, self.text_adaptor = model.image_adaptor, model.text_adaptor
        self.tower = None if model.image_tower is None else GradSampleModule(
            model.image_tower, batch_first=True, loss_reduction="sum")
        self.scale = model.config.logit_scale
        self.register_buffer("rows", prompts.embeddings.float())
        self.register_buffer("averaging", prompts.averaging.float())
        # logit c = s·(cos with mean 2c − cos with mean 2c + 1): polarity[2c, c] = 1, polarity[2c + 1, c] = −1
        self.register_buffer("polarity", torch.kron(torch.eye(len(self.averaging) // 2), torch.tensor([[1.0], [-1.0]])))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.score(F.normalize(self.image_adaptor(self._embed(images)), dim=-1), self.text_adaptor(self.rows))

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.tower is None else self.tower(images)

    def close(self) -> None:
        """Remove opacus' hooks from the image tower (the model goes on without them)."""
        if self.tower is not None:
            self.tower.remove_hooks()

    def score(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of L2-normalised adapted images against adapted prompt rows [R, d]."""
        return self.scale * (image @ F.normalize(self.averaging @ text, dim=-1).T @ self.polarity)

    def clipped_backward(self, images: torch.Tensor, labels: torch.Tensor, max_grad_norm: float,
                         weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Set each parameter's ``.grad`` to the sum over samples of its clipped per-sample gradient of masked BCE;
        returns (per-sample losses, per-sample gradient norms over everything that trains, before clipping).
        ``images`` are cached embeddings, or preprocessed images when LoRA adapts the image tower; ``weights``
        weigh each label entry of a sample's own loss (distilled ones, :mod:`shared.continual`)."""
        embedded = self._embed(images)
        with _recording(self.image_adaptor) as image_calls:
            image = F.normalize(self.image_adaptor(embedded), dim=-1)
        with torch.no_grad(), _recording(self.text_adaptor) as text_calls:  # its gradients come from _TextBranch
            text = self.text_adaptor(self.rows)
        logits = self.score(image, text)
        losses = masked_bce(logits, labels, "none", weights)
        wrt = [out for _, _, out in image_calls] + [logits] + ([embedded] if self.tower is not None else [])
        grads = list(torch.autograd.grad(losses.sum(), wrt, retain_graph=self.tower is not None))
        lora = self._lora_samples(embedded, grads.pop()) if self.tower is not None else []
        *errors, dlogits = grads
        with torch.no_grad():
            branch = _TextBranch(self, text_calls, text, image, dlogits)
            squares = branch.squares() + sum(e.square().sum(1) * (x.square().sum(1) + 1)
                                             for (_, x, _), e in zip(image_calls, errors))
            squares = squares + sum(g.flatten(1).square().sum(1) for _, g in lora)
            norms = squares.clamp(min=0).sqrt()
            clip = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for (layer, x, _), e in zip(image_calls, errors):
                layer.weight.grad, layer.bias.grad = (clip[:, None] * e).T @ x, clip @ e
            branch.clipped(clip)
            for p, g in lora:
                p.grad = torch.einsum("n,n...->...", clip, g)
        return losses.detach(), norms

    def _lora_samples(self, embedded: torch.Tensor, grad: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Per-sample gradients [B, ...] of each LoRA matrix, from opacus' hooks, given dL/d embedded [B, d]."""
        with warnings.catch_warnings():  # the frozen layers under the LoRA ones take no gradient, as intended
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            embedded.backward(grad)
        out = []
        for name, p in self.tower.named_parameters():
            if p.requires_grad:
                if getattr(p, "grad_sample", None) is None:
                    raise RetuneError(f"opacus has no per-sample gradient of LoRA parameter {name} (a LoRA layer "
                                      "that is not called as a module, such as one in a MultiheadAttention): DP-SGD "
                                      "needs LoRA on Linear layers (--lora-targets)")
                out.append((p, p.grad_sample))
                p.grad_sample = None
        return out


@dataclass(frozen=True)
class _TextLayer:
    """One Linear of the text adaptor: per-sample factor v [B, out], shared w [2C, out], the ReLU mask after it
    [R, out] (None for the last Linear), and its input rows with a column of ones for the bias [R, in + 1]."""

    layer: nn.Linear
    v: torch.Tensor
    w: torch.Tensor
    mask: torch.Tensor | None
    x: torch.Tensor


class _TextBranch:
    """Per-sample gradients of the text adaptor (Linear, or Linear–ReLU–Linear, ± residual mix) in factored form."""

    def __init__(self, module: PerSampleRetune, calls: list[Call], text: torch.Tensor, image: torch.Tensor,
                 dlogits: torch.Tensor) -> None:
        adaptor = module.text_adaptor
        mean = module.averaging @ text
        length = mean.norm(dim=-1).clamp(min=1e-12)  # as F.normalize
        unit = mean / length[:, None]
        alpha = adaptor.alpha if getattr(adaptor, "kind", None) == "residual" else 1.0
        self.spread = (module.scale * alpha / length)[:, None] * module.polarity  # a = dlogits @ spreadᵀ
        self.dlogits, self.a, self.cos = dlogits, dlogits @ self.spread.T, image @ unit.T
        self.averaging = module.averaging
        self.layers: list[_TextLayer] = []
        v, w, mask = image, unit, None
        for j in reversed(range(len(calls))):
            if j < len(calls) - 1:  # through Linear j+1, then the ReLU between them
                above = calls[j + 1][0].weight
                v, w, mask = v @ above, w @ above, calls[j + 1][1] > 0
            x = calls[j][1]
            self.layers.append(_TextLayer(calls[j][0], v, w, mask, torch.cat([x, torch.ones_like(x[:, :1])], 1)))

    def squares(self) -> torch.Tensor:
        """Per-sample squared gradient norms [B] over the text adaptor's parameters."""
        return sum(self._quadratic(layer) for layer in self.layers)

    def clipped(self, clip: torch.Tensor) -> None:
        """Set the text adaptor's ``.grad`` to Σ_i clip_i·g_i."""
        ca = clip[:, None] * self.a
        for t in self.layers:
            rows = self.averaging.T @ (ca.T @ t.v - (ca * self.cos).sum(0)[:, None] * t.w)
            grad = (rows if t.mask is None else rows * t.mask).T @ t.x
            t.layer.weight.grad, t.layer.bias.grad = grad[:, :-1], grad[:, -1]

    def _quadratic(self, t: _TextLayer) -> torch.Tensor:
        """Σ_kl Σ_o u_iko·u_ilo·Q_klo, u_iko = a_ik·(v_io − cos_ik·w_ko), Q the shared Gram (:meth:`_gram`)."""
        gram, spread, d, ac = self._gram(t), self.spread, self.dlogits, self.a * self.cos
        k, c = spread.shape
        qp = torch.einsum("klo,lc->kco", gram, spread)  # a_i·Q = Σ_c dlogits_ic·qp[:, c]
        pqp = torch.einsum("kc,kdo->cdo", spread, qp)  # a_iᵀ·Q·a_i = Σ_cd dlogits_ic·dlogits_id·pqp[c, d]
        if t.mask is None:  # Q does not depend on o: contract over o first
            vv = t.v.square().sum(1) * ((d @ pqp[:, :, 0]) * d).sum(1)
            vw = (((ac * (t.v @ t.w.T)) @ qp[:, :, 0]) * d).sum(1)
            ww = (t.w @ t.w.T) * gram[:, :, 0]
        else:
            vv = (_pairs(d, d) * (t.v.square() @ pqp.reshape(c * c, -1).T)).sum(1)
            vw = (_pairs(ac, d) * (t.v @ (t.w[:, None] * qp).reshape(k * c, -1).T)).sum(1)
            ww = (t.w[:, None] * t.w * gram).sum(-1)
        return vv - 2 * vw + ((ac @ ww) * ac).sum(1)

    def _gram(self, t: _TextLayer) -> torch.Tensor:
        """Q[k, l, o] = Σ_rs A_kr·m_ro·(x xᵀ)_rs·A_ls·m_so, [2C, 2C, out]; [2C, 2C, 1] without a mask."""
        a, g = self.averaging, t.x @ t.x.T
        if t.mask is None:
            return (a @ g @ a.T)[:, :, None]
        masked = a.T[:, :, None] * t.mask[:, None]  # A_kr·m_ro as [R, 2C, out]
        right = (g @ masked.flatten(1)).view_as(masked) * t.mask[:, None]
        return (a @ right.flatten(1)).view(len(a), len(a), -1)


def _pairs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, K·L]: p_ik·q_il."""
    return (p[:, :, None] * q[:, None, :]).flatten(1)


@contextmanager
def _recording(adaptor: nn.Module) -> Iterator[list[Call]]:
    """Each call of a Linear of ``adaptor`` inside the block, in order: (layer, input, output)."""
    calls: list[Call] = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out)))
             for m in adaptor.modules() if isinstance(m, nn.Linear)]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()
