"""A frozen model that lives in host memory and visits the GPU (``learner.reference_device: cpu``).

The reference model of a full fine-tune is a second copy of the weights (2 bytes a parameter in
bf16: 8.8 GiB for the 3B, 16.6 GiB for the 7B) that the learner needs only for the reference
log-probs. Kept in pinned host memory, it comes to the GPU once a step, computes the reference
log-probs of every micro-batch, and leaves before the policy's forward and backward, whose
activations make the learner's peak: the peak loses the reference's bytes, the step gains one
host-to-device copy of them (pinned: about 20 GB/s on a PCIe 5 host).

Nothing is copied back: the weights are frozen, so leaving is pointing each tensor at its host
copy again and letting the allocator take the device copies.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class HostResident:
    """``module``'s parameters and buffers moved to host memory (pinned when ``device`` is a GPU);
    :meth:`on_device` brings them to ``device`` for the time of a ``with`` block."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device
        pin = device.type == "cuda"
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            host = tensor.detach().to("cpu")
            if pin:
                host = host.pin_memory()
            tensor.data = host
            self.tensors.append((tensor, host))
        if pin:
            torch.cuda.empty_cache()  # the device copies' blocks, for the optimizer states that follow

    @contextmanager
    def on_device(self) -> Iterator[torch.nn.Module]:
        """The module with its weights on the device; back on the host (device copies freed) after."""
        for tensor, host in self.tensors:
            tensor.data = host.to(self.device, non_blocking=True)
        try:
            yield self.module
        finally:
            for tensor, host in self.tensors:
                tensor.data = host
