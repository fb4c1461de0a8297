"""One Gemma MLP-sized pair of linears (2048->8192->2048) on XNNPACK, fp32 and 8da4w at several
group sizes, at 128 tokens and at 1 token, against eager fp32: the measurement behind the default
--group-size (docs/benchmarks.md).  python docs/microbench_group_size.py"""
import sys, tempfile, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from torch import nn
from gemma3n_executorch import quantize, lowering
from executorch.runtime import Runtime
import executorch.kernels.quantized  # noqa
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.a = nn.Linear(2048, 8192, bias=False); s.b = nn.Linear(8192, 2048, bias=False)
    def forward(s, x): return s.b(torch.nn.functional.gelu(s.a(x)))
results = {}
for scheme, group in [("none", 0), ("8da4w", 32), ("8da4w", 128), ("8da4w", 256), ("8da4w", 0), ("8da8w", 0)]:
    m = M().eval()
    if scheme != "none": quantize.quantize_linears(m, scheme, group, torch.float32)
    n = torch.export.Dim("n", min=1, max=256)
    ep = lowering.export(m, (torch.randn(1, 4, 2048),), ({1: n},))
    prog, _ = lowering.lower(ep, "xnnpack", {})
    path = f"{tempfile.gettempdir()}/gemm-{scheme}-{group}.pte"; lowering.write_atomically(prog, __import__("pathlib").Path(path))
    meth = Runtime.get().load_program(path).load_method("forward")
    for tokens in (128, 1):
        x = torch.randn(1, tokens, 2048)
        meth.execute([x])
        reps = 5 if tokens == 128 else 100
        t = time.perf_counter()
        for _ in range(reps): meth.execute([x])
        dt = (time.perf_counter() - t) / reps
        print(f"{scheme} g{group} M={tokens}: {dt*1e3:.2f} ms  ({2*2*2048*8192*tokens/dt/1e9:.1f} GFLOPS)", flush=True)
x = torch.randn(1, 128, 2048); m = M().eval()
with torch.no_grad():
    m(x); t = time.perf_counter()
    for _ in range(5): m(x)
    print("eager fp32 M=128", (time.perf_counter()-t)/5*1e3, "ms")
    x = torch.randn(1, 1, 2048); t = time.perf_counter()
    for _ in range(100): m(x)
    print("eager fp32 M=1", (time.perf_counter()-t)/100*1e3, "ms")
