"""Show the adjoint in a few seconds: activation memory and gradient vs backprop.

Builds the paper's small ResNet with residual functions that are nonzero and
piecewise constant in depth, and takes one SGD step on one random batch
twice from the same weights: once with backprop, once with the memory-free
adjoint. Prints, for each, the bytes of activations kept for the backward
pass (counted through autograd's saved-tensor hooks, so the count is the
same on a CPU and a GPU), the CUDA allocator peak when on a GPU, the loss
before and after the step, and how far the adjoint's gradient is from the
exact one.
"""

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resnet_ode.experiments.common import DEVICES, positive_int
from resnet_ode.io import atomic_write_json, provenance
from resnet_ode.models import SmallResNet
from resnet_ode.stack import SCHEMES
from resnet_ode.training import resolve_device

GRADIENTS = ("backprop", "adjoint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Depth, scheme, batch, device; optional --out for a metrics.json."""
    parser.add_argument(
        "--depth", type=positive_int, default=64, help="residual functions N"
    )
    parser.add_argument("--scheme", choices=SCHEMES, default="euler")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--out", help="also write the numbers to OUT/metrics.json")


def build_model(depth: int, scheme: str) -> SmallResNet:
    """SmallResNet whose residual functions start nonzero, smooth in depth.

    The paper's initialisation zeroes each function's last BatchNorm, which
    makes every function zero and the adjoint trivially exact; a weight of 1
    gives functions of order one that are still piecewise constant in depth
    (the depth-8 initialisation), the regime of a trained network.
    """
    model = SmallResNet(depth, scheme=scheme, init_depth=8)
    with torch.no_grad():
        for function in model.stack.functions:
            function[-1].weight.fill_(1.0)
    return model


class SavedActivationBytes:
    """Bytes of non-parameter tensors autograd keeps for backward (unique storages)."""

    def __init__(self, model):
        self.parameter_storages = {
            p.untyped_storage().data_ptr() for p in model.parameters()
        }
        self.storages = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.parameter_storages:
            self.storages[pointer] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def one_step(model, images, labels, device) -> dict:
    """One SGD step; returns memory, time, losses and the gradient vector."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = SavedActivationBytes(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    started = time.perf_counter()

    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
    optimizer.step()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    cuda_peak = None
    if device.type == "cuda":
        cuda_peak = torch.cuda.max_memory_allocated(device) - baseline
    with torch.no_grad():
        loss_after = F.cross_entropy(model(images), labels).item()
    return {
        "saved_activation_bytes": saved.total,
        "cuda_peak_bytes_above_start": cuda_peak,
        "seconds": seconds,
        "loss_before": loss.item(),
        "loss_after": loss_after,
        "gradient": gradient.detach(),
    }


def run(args: argparse.Namespace) -> int:
    """Run the demonstration and print its numbers."""
    if args.scheme == "heun" and args.depth < 2:
        raise ValueError(f"--scheme heun needs --depth >= 2, got {args.depth}")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    base = build_model(args.depth, args.scheme).to(device)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)

    results = {}
    for grad in GRADIENTS:
        model = copy.deepcopy(base)
        model.stack.adjoint = grad == "adjoint"
        results[grad] = one_step(model, images, labels, device)

    exact, approximate = results["backprop"]["gradient"], results["adjoint"]["gradient"]
    relative_error = ((approximate - exact).norm() / exact.norm()).item()
    cosine = F.cosine_similarity(approximate, exact, dim=0).item()
    for result in results.values():
        del result["gradient"]

    print_report(args, device, results, relative_error, cosine)
    if args.out:
        metrics = {
            "config": {k: v for k, v in vars(args).items() if k != "run"},
            "provenance": provenance(),
            "device": str(device),
            "methods": results,
            "gradient_relative_error": relative_error,
            "gradient_cosine_similarity": cosine,
        }
        atomic_write_json(Path(args.out) / "metrics.json", metrics)
    return 0


def print_report(args, device, results, relative_error, cosine) -> None:
    print(
        f"Small ResNet, {args.depth} residual functions ({args.scheme}, step "
        f"1/{args.depth}), batch {args.batch_size}, one SGD step on {device}:"
    )
    print(f"{'':10} {'activations kept':>18} {'loss before':>12} {'after':>8}")
    for grad, result in results.items():
        kept = result["saved_activation_bytes"] / 2**20
        line = (
            f"{grad:10} {kept:15.2f} MiB {result['loss_before']:12.4f} "
            f"{result['loss_after']:8.4f}"
        )
        if result["cuda_peak_bytes_above_start"] is not None:
            peak = result["cuda_peak_bytes_above_start"] / 2**20
            line += f"   CUDA peak {peak:.1f} MiB"
        print(line)
    print(
        f"adjoint gradient vs backprop: relative error {relative_error:.2e}, "
        f"cosine similarity {cosine:.6f}"
    )
