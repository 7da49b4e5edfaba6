"""Check and time the CUDA backend on a real NVIDIA GPU (H100/H200 class).

    python bench/gpu_check.py [--quick] [--out results.md] [--no-compile]

(a) correctness: every kernel at realistic shapes (65536x1000, 8192x32000, 4096x128256; fewer rows with
    --quick) against float64 PyTorch references on a row subset, against the same kernels in float64,
    and against the CPU backend on a smaller row subset;
(b) speed of the distillation loss 0.5*CE + 0.5*tau^2*KL (tau=4, mean, float32), forward and
    forward+gradient, against PyTorch eager, torch.compile and Liger-Kernel (when importable), and
    against the memory roofline (ideal bytes / measured device-to-device copy bandwidth);
(c) host overhead per call at 64x1000 from PyTorch tensors.

Timings: torch.cuda.Event, warm-up, median of repeats. The table is printed last and written to --out.
Importable and --help-able without a GPU; exits with status 2 when no CUDA GPU is usable.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FULL_SHAPES = [(65536, 1000), (8192, 32000), (4096, 128256)]
QUICK_SHAPES = [(8192, 1000), (1024, 32000), (512, 128256)]
TAU = 4.0
IGNORE = -100


def _losses(fd):
    """(name, distiller-or-loss factory, uses labels)."""
    D, R = fd.DistilLoss, fd.ResponseDistiller
    return [
        ("kl", lambda: D.kl_divergence(TAU), False),
        ("reverse_kl", lambda: D.reverse_kl(TAU), False),
        ("jsd0", lambda: D.jsd(0.0, TAU), False),
        ("jsd.5", lambda: D.jsd(0.5, TAU), False),
        ("jsd1", lambda: D.jsd(1.0, TAU), False),
        ("skew_kl", lambda: D.skew_kl(0.1, TAU), False),
        ("skew_rkl", lambda: D.skew_reverse_kl(0.1, TAU), False),
        ("tvd", lambda: D.tvd(TAU), False),
        ("mse", lambda: D.mse(), False),
        ("cosine", lambda: D.cosine(), False),
        ("combined", lambda: D.combined(0.7, 0.3, TAU), False),
        ("ce+kl t=4", lambda: R(D.kl_divergence(TAU), 0.5, 0.5, label_smoothing=0.1), True),
        ("ce+kl t=1", lambda: R(D.kl_divergence(1.0), 0.5, 0.5), True),
        ("ce+jsd", lambda: R(D.jsd(0.5, 2.0), 0.3, 0.7), True),
    ]


def _torch_rows(torch, name, s, t, y):
    """Per-row float64 reference losses (PyTorch ops), to be differentiated w.r.t. s."""
    F = torch.nn.functional

    def kl(a, la, lb):
        return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)

    def soft(kind, tau, param=0.5):
        lp, lq = F.log_softmax(t / tau, -1), F.log_softmax(s / tau, -1)
        p, q = lp.exp(), lq.exp()
        t2 = tau * tau
        if kind == "kl":
            return t2 * kl(p, lp, lq)
        if kind == "rkl":
            return t2 * kl(q, lq, lp)
        if kind == "jsd":
            if param == 0.0:
                return t2 * kl(p, lp, lq)
            if param == 1.0:
                return t2 * kl(q, lq, lp)
            lm = torch.log(param * p + (1 - param) * q)
            return t2 * (param * kl(p, lp, lm) + (1 - param) * kl(q, lq, lm))
        if kind == "skew_kl":
            return t2 * kl(p, lp, torch.log(param * p + (1 - param) * q))
        if kind == "skew_rkl":
            return t2 * kl(q, lq, torch.log((1 - param) * p + param * q))
        if kind == "tvd":
            return 0.5 * (p - q).abs().sum(-1)
        raise ValueError(kind)

    keep = y != IGNORE
    yy = torch.where(keep, y, torch.zeros_like(y))
    table = {
        "kl": lambda: soft("kl", TAU), "reverse_kl": lambda: soft("rkl", TAU),
        "jsd0": lambda: soft("jsd", TAU, 0.0), "jsd.5": lambda: soft("jsd", TAU, 0.5),
        "jsd1": lambda: soft("jsd", TAU, 1.0), "skew_kl": lambda: soft("skew_kl", TAU, 0.1),
        "skew_rkl": lambda: soft("skew_rkl", TAU, 0.1), "tvd": lambda: soft("tvd", TAU),
        "mse": lambda: ((t - s) ** 2).mean(-1),
        "cosine": lambda: 1 - F.cosine_similarity(s, t, dim=-1, eps=0.0),
        "combined": lambda: 0.7 * soft("kl", TAU) + 0.3 * ((t - s) ** 2).mean(-1),
    }
    if name in table:
        return table[name]()
    if name == "ce+kl t=4":
        rows = 0.5 * F.cross_entropy(s, yy, reduction="none", label_smoothing=0.1) + 0.5 * soft("kl", TAU)
    elif name == "ce+kl t=1":
        rows = 0.5 * F.cross_entropy(s, yy, reduction="none") + 0.5 * soft("kl", 1.0)
    else:
        tau = 2.0
        rows = 0.3 * F.cross_entropy(s, yy, reduction="none") + 0.7 * soft("jsd", tau, 0.5)
    return torch.where(keep, rows, torch.zeros_like(rows))


def _rel(a, b):
    den = max(float(b.abs().max()), 1e-30)
    return float((a.double() - b.double()).abs().max()) / den


def _time(torch, fn, reps, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def check(torch, fd, shapes, quick, lines, only=None, cpu=True):
    """(a): correctness. Appends table lines, returns the worst errors."""
    dev = "cuda"
    sub = 32 if quick else 64
    cpu_sub = 8
    lines.append("| check | shape | rows/grad vs f64 torch (subset) | f32 vs f64 kernels | vs CPU backend (subset) |")
    lines.append("|---|---|---|---|---|")
    worst = 0.0
    g = torch.Generator(device=dev).manual_seed(0)
    for rows, n in shapes:
        s = torch.randn(rows, n, device=dev, generator=g) * 2
        t = torch.randn(rows, n, device=dev, generator=g) * 2
        y = torch.randint(0, n, (rows,), device=dev, generator=g)
        y[::7] = IGNORE
        for name, make, with_labels in _losses(fd):
            if only and name not in only:
                continue
            obj = make()
            lab = y if with_labels else None
            if with_labels:
                obj.loss_and_grad(s, t, lab, reduction="none")  # the first call compiles; check the second
                r32, g32 = obj.loss_and_grad(s, t, lab, reduction="none")
                r64, g64 = obj.loss_and_grad(s[:sub].double(), t[:sub].double(), lab[:sub], reduction="none")
            else:
                obj.compute_with_grad(s, t, reduction="none")
                r32, g32 = obj.compute_with_grad(s, t, reduction="none")
                r64, g64 = obj.compute_with_grad(s[:sub].double(), t[:sub].double(), reduction="none")
            assert isinstance(r32, torch.Tensor) and r32.is_cuda and g32.shape == s.shape
            ss = s[:sub].double().requires_grad_(True)
            ref = _torch_rows(torch, name, ss, t[:sub].double(), y[:sub])
            ref.sum().backward()
            e_ref = max(_rel(r32[:sub], ref.detach()), _rel(g32[:sub], ss.grad))
            e_64 = max(_rel(r32[:sub], r64), _rel(g32[:sub], g64))
            e_ref64 = max(_rel(r64, ref.detach()), _rel(g64, ss.grad))
            e_cpu = float("nan")
            if cpu and name in ("kl", "jsd.5", "mse", "ce+kl t=4"):  # CPU compiles are slow: a few variants
                sc, tc = s[:cpu_sub].cpu().numpy(), t[:cpu_sub].cpu().numpy()
                if with_labels:
                    rc, gc = obj.loss_and_grad(sc, tc, y[:cpu_sub].cpu().numpy(), reduction="none", backend="cpu")
                else:
                    rc, gc = obj.compute_with_grad(sc, tc, reduction="none", backend="cpu")
                e_cpu = max(_rel(r32[:cpu_sub], torch.as_tensor(rc, device=dev)),
                            _rel(g32[:cpu_sub], torch.as_tensor(gc, device=dev)))
            worst = max(worst, e_ref, e_cpu if e_cpu == e_cpu else 0.0)
            lines.append(f"| {name} | {rows}x{n} | {e_ref:.1e} (f64 kernels {e_ref64:.1e}) | {e_64:.1e} | {e_cpu:.1e} |")
        for log in (False, True):
            fn = fd.log_softmax if log else fd.softmax
            out = fn(s, TAU)
            ref = torch.log_softmax(s[:sub].double() / TAU, -1)
            ref = ref if log else ref.exp()
            e = _rel(out[:sub], ref)
            worst = max(worst, e)
            lines.append(f"| {'log_softmax' if log else 'softmax'} | {rows}x{n} | {e:.1e} | | |")
        del s, t, y
        torch.cuda.empty_cache()
    return worst


def shards(torch, fd, lines, quick):
    """(a'): vocabulary shards on the GPU: three uneven shards of CUDA tensors, their rounds combined
    in-process with torch (what an NCCL all-reduce does; one GPU cannot host two NCCL ranks), against
    the unsharded GPU call. Returns the worst error."""
    dev = "cuda"
    rows, n = (256, 32000) if quick else (1024, 128256)
    g = torch.Generator(device=dev).manual_seed(1)
    s = torch.randn(rows, n, device=dev, generator=g) * 2
    t = torch.randn(rows, n, device=dev, generator=g) * 2
    y = torch.randint(0, n, (rows,), device=dev, generator=g)
    y[::7] = IGNORE
    cuts = [0, n // 5, n // 2 + 3, n]
    lines.append("| shards (3, uneven) | shape | loss vs unsharded | grad vs unsharded | rounds (numbers per row) |")
    lines.append("|---|---|---|---|---|")
    worst = 0.0
    for name, make in (("kl", lambda: fd.DistilLoss.kl_divergence(TAU)), ("jsd.5", lambda: fd.DistilLoss.jsd(0.5, TAU)),
                       ("tvd", lambda: fd.DistilLoss.tvd(TAU))):
        d = fd.ResponseDistiller(make(), 0.5, 0.5)
        want, gw = d.loss_and_grad(s, t, y)
        parts = [d.vocab_shard(s[:, a:b].contiguous(), t[:, a:b].contiguous(), y, class_offset=a, classes=n)
                 for a, b in zip(cuts, cuts[1:])]
        widths = []
        for items in zip(*[p.exchanges() for p in parts]):
            bufs = [b for b, _ in items]
            widths.append(bufs[0].shape[1])
            stack = torch.stack(bufs)
            combined = stack.amax(0) if items[0][1] == "max" else stack.sum(0)
            for b in bufs:
                b.copy_(combined)
        res = [p.result() for p in parts]
        e_loss = max(abs(lo - want) / abs(want) for lo, _ in res)
        e_grad = _rel(torch.cat([gr for _, gr in res], dim=1), gw)
        worst = max(worst, e_loss, e_grad)
        lines.append(f"| {name} | {rows}x{n} | {e_loss:.1e} | {e_grad:.1e} | {widths} |")
    del s, t, y
    torch.cuda.empty_cache()
    return worst


def speed(torch, fd, shapes, quick, use_compile, lines):
    """(b): the distillation loss against PyTorch eager / torch.compile / Liger / roofline."""
    F = torch.nn.functional
    reps = 5 if quick else 20
    # memory bandwidth: device-to-device copy, bytes read + written
    buf = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(buf)
    ms = _time(torch, lambda: dst.copy_(buf), reps)
    bw = 2 * buf.numel() * 4 / (ms * 1e-3)
    del buf, dst
    lines.append("")
    lines.append(f"Device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s (read + write).")
    lines.append("")

    def eager_loss(s, t, y):
        ce = F.cross_entropy(s, y, ignore_index=IGNORE)
        kl = F.kl_div(F.log_softmax(s / TAU, -1), F.log_softmax(t / TAU, -1), log_target=True,
                      reduction="batchmean") * TAU * TAU
        return 0.5 * ce + 0.5 * kl

    compiled = torch.compile(eager_loss) if use_compile else None
    liger = None
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

        lce, lkl = LigerCrossEntropyLoss(ignore_index=IGNORE), LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def liger(s, t, y):
            return 0.5 * lce(s, y) + 0.5 * lkl(F.log_softmax(s / TAU, -1), F.log_softmax(t / TAU, -1)) * TAU * TAU
        import liger_kernel  # noqa: F401

        from importlib.metadata import version

        lines.append(f"Liger-Kernel {version('liger-kernel')}: LigerCrossEntropyLoss + LigerKLDIVLoss.")
    except Exception as exc:  # noqa: BLE001 - optional baseline
        liger = None
        lines.append(f"Liger-Kernel not importable ({type(exc).__name__}: {exc}).")
    lines.append("")
    lines.append("| shape | pass | fastdistill ms | roofline ms (% of it) | eager ms | torch.compile ms | Liger ms |")
    lines.append("|---|---|---|---|---|---|---|")
    d = fd.ResponseDistiller.balanced()
    g = torch.Generator(device="cuda").manual_seed(1)
    for rows, n in shapes:
        s = torch.randn(rows, n, device="cuda", generator=g) * 2
        t = torch.randn(rows, n, device="cuda", generator=g) * 2
        y = torch.randint(0, n, (rows,), device="cuda", generator=g)
        gbuf = torch.empty_like(s)
        for passname in ("fwd", "fwd+grad"):
            el = rows * n * 4
            ideal = (2 * el if passname == "fwd" else 3 * el) / bw * 1e3
            if passname == "fwd":
                ours = _time(torch, lambda: d.loss(s, t, y), reps)

                def base(fn):
                    return _time(torch, lambda: fn(s, t, y), reps)
            else:
                ours = _time(torch, lambda: d.loss_and_grad(s, t, y, grad_out=gbuf), reps)
                sg = s.detach().clone().requires_grad_(True)

                def base(fn):
                    def step():
                        sg.grad = None
                        fn(sg, t, y).backward()
                    return _time(torch, step, reps)
            eager = base(eager_loss)
            comp = base(compiled) if compiled is not None else float("nan")
            lig = base(liger) if liger is not None else float("nan")
            lines.append(f"| {rows}x{n} | {passname} | {ours:.3f} | {ideal:.3f} ({100 * ideal / ours:.0f}%) | "
                         f"{eager:.3f} | {comp:.3f} | {lig:.3f} |")
        del s, t, y, gbuf
        torch.cuda.empty_cache()


def overhead(torch, fd, lines, quick):
    """(c): host time per call at 64x1000 from PyTorch tensors."""
    s = torch.randn(64, 1000, device="cuda")
    t = torch.randn(64, 1000, device="cuda")
    y = torch.randint(0, 1000, (64,), device="cuda")
    gbuf = torch.empty_like(s)
    d = fd.ResponseDistiller.balanced()
    kl = fd.DistilLoss.kl_divergence(TAU)
    n = 200 if quick else 1000
    lines.append("")
    lines.append("| host overhead, 64x1000 float32 torch tensors | us per call |")
    lines.append("|---|---|")
    sr = s.detach().clone().requires_grad_(True)  # a model's output
    cases = [
        ("KL, reduction='none', grad (no host sync)", lambda: kl.compute_with_grad(s, t, reduction="none", grad_out=gbuf)),
        ("0.5 CE + 0.5 KL, mean, grad (returns a float: syncs)", lambda: d.loss_and_grad(s, t, y, grad_out=gbuf)),
        ("the same, student requires grad", lambda: d.loss_and_grad(sr, t, y, grad_out=gbuf)),
        ("softmax", lambda: fd.softmax(s, TAU)),
    ]
    for name, fn in cases:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / n * 1e6
        lines.append(f"| {name} | {us:.1f} |")
    dev_ms = _time(torch, lambda: kl.compute_with_grad(s, t, reduction="none", grad_out=gbuf), 50)
    lines.append(f"| (device time of the first case, events) | {dev_ms * 1e3:.1f} |")
    host_profile(torch, lines, "0.5 CE + 0.5 KL, mean, grad", lambda: d.loss_and_grad(s, t, y, grad_out=gbuf), n // 2)


def host_profile(torch, lines, name, fn, n, top=15):
    """Where a call's host time goes: the functions with the most own time (cProfile), per call.

    cProfile adds its own cost to every Python call, so the absolute numbers are inflated (compare them
    with each other, not with the timings above)."""
    import cProfile
    import pstats

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(pr).stats  # (file, line, function) -> (primitive calls, calls, own s, cumulative s, ..)
    total = sum(v[2] for v in stats.values())
    lines.append("")
    lines.append(f"Host profile of '{name}', {n} calls: {total / n * 1e6:.0f} us per call under cProfile.")
    lines.append("")
    lines.append("| function | calls per call | own us per call | cumulative us per call |")
    lines.append("|---|---|---|---|")
    for (file, line, func), (_, calls, own, cum, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = f"{Path(file).name}:{line}" if line else file
        lines.append(f"| {func} ({where}) | {calls / n:.1f} | {own / n * 1e6:.1f} | {cum / n * 1e6:.1f} |")


class _Lines(list):
    """Table lines, echoed as they come (a run cut short still shows what it measured)."""

    def __init__(self, first):
        super().__init__()
        for line in first:
            self.append(line)

    def append(self, line):
        print(line, flush=True)
        super().append(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows and repeats (about a minute)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) to this path")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--skip-check", action="store_true", help="timings only")
    ap.add_argument("--skip-speed", action="store_true", help="correctness only")
    ap.add_argument("--losses", default="", help="check only these losses (comma-separated names)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the comparison with the CPU backend")
    ap.add_argument("--check-quick", action="store_true", help="check at the --quick shapes, time at the full ones")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*under-utilization.*")
    try:
        import torch
    except ImportError:
        print("gpu_check needs PyTorch with CUDA", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is available", file=sys.stderr)
        return 2
    import fastdistill as fd

    if "cuda" not in fd.available_backends():
        from fastdistill import cuda as fc

        print(f"gpu_check: the CUDA backend is not usable: {fc.status()[1]}", file=sys.stderr)
        return 2
    from fastdistill import cuda as fc

    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    lines = _Lines([f"fastdistill GPU check on {fc.status()[1]}, torch {torch.__version__}"
                    f"{' (--quick)' if args.quick else ''}", ""])
    t0 = time.time()
    worst = 0.0
    if not args.skip_check:
        only = {x.strip() for x in args.losses.split(",") if x.strip()}
        worst = check(torch, fd, QUICK_SHAPES if args.check_quick else shapes, args.quick, lines, only,
                      not args.no_cpu)
        lines.append("")
        worst = max(worst, shards(torch, fd, lines, args.quick))
        lines.append("")
        lines.append(f"worst relative error of float32 results against the references: {worst:.2e} "
                     f"({'OK' if worst < 1e-5 else 'ABOVE 1e-5'}); check took {time.time() - t0:.0f} s")
    t1 = time.time()
    if not args.skip_speed:
        speed(torch, fd, shapes, args.quick, not args.no_compile, lines)
        overhead(torch, fd, lines, args.quick)
        lines.append("")
        lines.append(f"timings took {time.time() - t1:.0f} s; kernel launches: {fc.launch_path()}")
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
