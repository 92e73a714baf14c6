"""Eager torch must run as fast after `import tts_kernels` as before (one OpenMP runtime, no spinning).

    python benchmarks/check_openmp.py 0   # eager twice, no import
    python benchmarks/check_openmp.py 1   # eager, import + one beam_topk call, eager
"""
import sys, time, statistics, torch
x = torch.randn(64, 128256)
def t():
    f = lambda: torch.log_softmax(x, -1).topk(16)
    for _ in range(3): f()
    r = []
    for _ in range(5):
        s = []
        for _ in range(10):
            t0 = time.perf_counter(); f(); s.append(time.perf_counter() - t0)
        r.append(statistics.median(s))
    return min(r) * 1e3
a = t()
if sys.argv[1] == "1":
    import tts_kernels
    tts_kernels.beam_topk(x, torch.zeros(8, 8))
b = t()
print(f"eager before {a:.2f} ms, after {b:.2f} ms (import={sys.argv[1]})")
