"""The build: one source list, CMake library, schema agreement, the no-extension fallback."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tts_kernels import _ext

from child_process import run_py
from source_list import listed_sources

ROOT = Path(__file__).resolve().parents[1]


def test_source_list_covers_csrc():
    listed = set()
    for kind, path in listed_sources():
        assert kind in ("cpu", "cuda"), (kind, path)
        assert (ROOT / path).is_file(), f"{path} is listed but missing"
        listed.add(path)
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu")}
    # python_module.cpp is the Python binding; only setup.py adds it.
    assert on_disk - {"csrc/python_module.cpp"} == listed


def test_python_schemas_match_cpp():
    # The fallback defines the same schemas as csrc/registration.cpp.
    for name, schema in _ext.SCHEMAS.items():
        cpp = getattr(torch.ops.tts, name).default._schema
        py = torch._C.parse_schema("tts::" + schema)
        assert str(cpp) == str(py)


def test_single_openmp_runtime():
    maps = [l.split()[-1] for l in open("/proc/self/maps") if "libgomp" in l]
    assert len(set(maps)) <= 1, f"two OpenMP runtimes loaded: {set(maps)}"


def test_fallback_without_extension():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import tts_kernels\n"
        "msgs = [str(x.message) for x in w if 'compiled extension not available' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert not tts_kernels.HAS_C\n"
        "from tts_kernels.reference import beam_topk_ref\n"
        "x = torch.randn(6, 40); s = torch.randn(2, 3)\n"
        "a = tts_kernels.beam_topk(x, s, 5); b = beam_topk_ref(x, s, 5)\n"
        "assert all(torch.equal(u, v) for u, v in zip(a, b))\n"
        "c = [torch.randn(3, 4)]; r = c[0][[2, 2, 0]].clone()\n"
        "tts_kernels.kv_reorder_(c, torch.tensor([2, 2, 0])); assert torch.equal(c[0], r)\n"
        "print('ok')\n"
    )
    res = run_py(code, TTS_KERNELS_NO_EXT="1")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_and_loads(tmp_path):
    prefix = torch.utils.cmake_prefix_path
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DCMAKE_PREFIX_PATH={prefix}"],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j", "2"], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    lib = tmp_path / "libtts_kernels.so"
    assert lib.is_file()
    # Load it alone (not beside tts_kernels._C: both register the tts namespace).
    res = run_py(
        "import torch\n"
        f"torch.ops.load_library({str(lib)!r})\n"
        "x = torch.tensor([[0.0, 3.0, 1.0]]); s = torch.zeros(1, 1)\n"
        "sc, p, t = torch.ops.tts.beam_topk(x, s, 2, 1.0)\n"
        "assert t.tolist() == [[1, 2]], t\n"
        "print('ok')\n"
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
