"""The MoCo v2 model, and the helpers that turn its checkpoints back into a backbone.

MoCo (He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020) with the v2 changes (Chen et al., "Improved Baselines with Momentum
Contrastive Learning", 2020: an MLP projection head and stronger augmentation). Its
symbols, named once here and used below:

- K: the number of negative keys held in the queue (`queue_size`);
- m: the momentum of the key encoder's moving average of the query encoder (`momentum`);
- T: the softmax temperature of the InfoNCE logits (`temperature`).

This module imports torch at import time. Stage modules import it inside functions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks import distributed

# Prefixes that MoCo checkpoints put in front of backbone keys: DistributedDataParallel
# adds "module.", and the MoCo model keeps the trained backbone in "encoder_q.".
_WRAPPER_PREFIX = "module."
_QUERY_ENCODER_PREFIX = "encoder_q."


def build_encoder(arch: str, dim: int) -> nn.Module:
    """Build a randomly initialised ResNet whose `fc` is the MoCo v2 MLP head to `dim` outputs."""
    import torchvision

    encoder = torchvision.models.get_model(arch, weights=None, num_classes=dim)
    hidden = encoder.fc.in_features
    encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), encoder.fc)
    return encoder


def build_backbone(arch: str) -> nn.Module:
    """Build a randomly initialised ResNet that returns pooled features (its `fc` removed)."""
    import torchvision

    backbone = torchvision.models.get_model(arch, weights=None)
    backbone.fc = nn.Identity()
    return backbone


def backbone_state_dict(state_dict: dict) -> dict:
    """Extract the query-encoder backbone from a MoCo state dict, without the projection head.

    Accepts the keys MoCo checkpoints have (`module.encoder_q.layer1...`), the same keys
    without `module.`, and a plain backbone state dict (`layer1...`). Keys of the key
    encoder, the queue and the `fc` head are dropped.
    """
    keys = list(state_dict)
    if keys and all(key.startswith(_WRAPPER_PREFIX) for key in keys):
        state_dict = {key[len(_WRAPPER_PREFIX):]: value for key, value in state_dict.items()}
    if any(key.startswith(_QUERY_ENCODER_PREFIX) for key in state_dict):
        state_dict = {key[len(_QUERY_ENCODER_PREFIX):]: value for key, value in state_dict.items()
                      if key.startswith(_QUERY_ENCODER_PREFIX)}
    return {key: value for key, value in state_dict.items() if not key.startswith("fc.")}


class MoCo(nn.Module):
    """A query encoder, a momentum key encoder and a queue of K negative keys.

    `forward(im_q, im_k)` returns the InfoNCE logits (positive key in column 0, then the
    K queue entries, all divided by T) and the all-zero labels, then enqueues the keys.

    Batch norm must not see the query and its positive key in the same batch, because
    the model would then learn from batch statistics instead of the images. Keys are
    therefore encoded in a shuffled order: across processes as in the MoCo reference
    when distributed, and within the process otherwise. Both encoders compute batch
    norm statistics over `bn_splits` groups of the local batch, so in a single process
    a query and its positive key land in different groups.
    """

    def __init__(self, arch: str, dim: int = 128, queue_size: int = 65536,
                 momentum: float = 0.999, temperature: float = 0.2, bn_splits: int = 1):
        super().__init__()
        self.queue_size = queue_size
        self.momentum = momentum
        self.temperature = temperature
        self.bn_splits = bn_splits

        self.encoder_q = build_encoder(arch, dim)
        self.encoder_k = build_encoder(arch, dim)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(),
                                    strict=True):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False

        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # C x K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(),
                                    strict=True):
            param_k.data.mul_(self.momentum).add_(param_q.data, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = distributed.gather_concat(keys)  # N_global x C
        count = keys.shape[0]
        start = int(self.queue_ptr)
        # Positions wrap around the end of the queue, so K need not be a multiple of
        # the global batch size. The oldest keys are replaced first.
        positions = (start + torch.arange(count, device=keys.device)) % self.queue_size
        self.queue[:, positions] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (start + count) % self.queue_size

    @torch.no_grad()
    def _batch_shuffle(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffle the global batch across processes; return the local slice and inverse order."""
        local_count = images.shape[0]
        gathered = distributed.gather_concat(images)  # N_global x 3 x H x W

        order = torch.randperm(gathered.shape[0], device=images.device)
        distributed.broadcast_from_main(order)
        inverse = torch.argsort(order)

        local_indices = order.view(-1, local_count)[distributed.current_rank()]
        return gathered[local_indices], inverse

    @torch.no_grad()
    def _batch_unshuffle(self, keys: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """Undo `_batch_shuffle` on the encoded keys; return this process's keys in input order."""
        local_count = keys.shape[0]
        gathered = distributed.gather_concat(keys)  # N_global x C
        local_indices = inverse.view(-1, local_count)[distributed.current_rank()]
        return gathered[local_indices]

    def _encode_in_groups(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Encode `images` in `bn_splits` groups so batch norm statistics stay within a group."""
        groups = max(1, min(self.bn_splits, images.shape[0] // 2))
        if groups == 1:
            return encoder(images)
        return torch.cat([encoder(chunk) for chunk in images.chunk(groups)], dim=0)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self._encode_in_groups(self.encoder_q, im_q).float(), dim=1)  # N x C

        with torch.no_grad():
            self._momentum_update_key_encoder()
            shuffled, inverse = self._batch_shuffle(im_k)
            k = self._encode_in_groups(self.encoder_k, shuffled)
            k = F.normalize(k.float(), dim=1)
            k = self._batch_unshuffle(k, inverse)  # N x C

        l_pos = (q * k).sum(dim=1, keepdim=True)  # N x 1
        l_neg = q @ self.queue.clone().detach()  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature  # N x (1 + K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

        self._dequeue_and_enqueue(k)
        return logits, labels
