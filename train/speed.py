"""Training-step throughput on this machine: fp32 vs channels_last vs bf16 autocast, per input size.

    python -m cxr_edge.train.speed --sizes 128,160,224 --modes fp32,cl,bf16,cl+bf16 --batch 8 --steps 3

Each (size, mode) builds DenseNet121 (random weights), runs one warm-up step and `steps` timed
forward+backward+AdamW steps on random data, and reports images/s of the median step; modes are
interleaved over `rounds` so a load change on a shared machine hits every mode alike. bf16 here is
torch.autocast("cpu", bfloat16): without native bf16 (no AVX512-BF16/AMX) it is emulated.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(size: int, mode: str, batch: int, steps: int, arch: str = "densenet121") -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process) of the median step.
    On a shared machine the second is the steadier number: it does not count time the process
    waited for a core (it does count OpenMP spin-waiting, hence --threads 1 there)."""
    import torch
    from cxr_edge.architectures import build
    torch.manual_seed(0)
    net = build({"name": arch, "head": "linear", "dropout": 0.0, "num_classes": 3, "in_channels": 3,
                 "input_size": size}).train()
    cl, bf16 = "cl" in mode, "bf16" in mode
    if cl:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 3, (batch,))
    if cl:
        x = x.to(memory_format=torch.channels_last)
    times, cpu = [], []
    for i in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return batch / statistics.median(times), batch / statistics.median(cpu)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxr_edge.train.speed", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128")
    ap.add_argument("--modes", default="fp32,cl,bf16,cl+bf16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arch", default="densenet121")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    a = ap.parse_args(argv)
    import os
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from .loop import cpu_bf16_support
    native, why = cpu_bf16_support()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"bf16: {why}", flush=True)
    res: dict = {}
    for r in range(a.rounds):
        for size in [int(s) for s in a.sizes.split(",")]:
            for mode in a.modes.split(","):
                wall, per_cpu = measure(size, mode, a.batch, a.steps, a.arch)
                res.setdefault(f"{size}/{mode}", []).append(per_cpu)
                print(f"round {r + 1} size {size} {mode}: {wall:.3f} img/s wall, {per_cpu:.3f} img per CPU-second",
                      flush=True)
    print(json.dumps({k: round(statistics.median(v), 3) for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
