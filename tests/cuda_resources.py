"""Static resource audit of the kl_fused CUDA kernels, from what ptxas reports for the compiled code.

Every csrc/cuda/*.cu is compiled by nvcc as setup.py compiles it, for every architecture its default
TORCH_CUDA_ARCH_LIST builds a cubin for (sm_80, sm_90, sm_100, sm_120; its PTX is compiled by the driver,
for GPUs that have no cubin here), with --resource-usage (ptxas: registers, stack frame, spill stores and loads, static shared memory per
kernel instantiation) and -keep (the PTX, whose .maxntid is each kernel's launch bound). A kernel
must not spill, and registers x the largest block it may be launched with must fit the SM's
register file (64K 32-bit registers), or the launch fails with "too many resources requested".

    python tests/cuda_resources.py           print the table
    python tests/cuda_resources.py --write   rewrite bench/results/cuda-resources.md
"""

import argparse
import concurrent.futures
import contextlib
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "bench" / "results" / "cuda-resources.md"
REGISTER_FILE = 65536  # 32-bit registers per SM (and per block) on sm_80, sm_90, sm_100 and sm_120
HARDWARE_MAX_THREADS = 1024


def _setup_module():
    """setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("kl_fused_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _environment(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def default_build():
    """(TORCH_CUDA_ARCH_LIST default of setup.py, the GPU code it builds: "sm_80", ..., "compute_120")."""
    setup = _setup_module()
    with _environment("TORCH_CUDA_ARCH_LIST", setup.DEFAULT_CUDA_ARCHS):
        return setup.DEFAULT_CUDA_ARCHS, tuple(setup.cuda_arch_codes().split(","))


ARCH_LIST, BUILT_CODES = default_build()
ARCHS = tuple(code[len("sm_"):] for code in BUILT_CODES if code.startswith("sm_"))  # ("80", "90", ...)


@dataclass(frozen=True)
class KernelResources:
    arch: str  # "sm_90"
    kernel: str  # "kl_rows_kernel<float, 4, true>"
    registers: int
    max_threads: int  # the launch bound (.maxntid), else the hardware's 1024
    stack_frame: int
    spill_stores: int
    spill_loads: int
    static_smem: int

    @property
    def register_demand(self):
        return self.registers * self.max_threads


def find_nvcc():
    """nvcc of the toolkit setup.py would use, or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def kernel_name(demangled):
    """'void ns::(anonymous namespace)::k<float, 4, true>(ns::Args<float>)' -> 'k<float, 4, true>'."""
    name = demangled.replace("(anonymous namespace)::", "")
    if name.startswith("void "):
        name = name[len("void ") :]
    depth = 0
    for i, char in enumerate(name):
        depth += char == "<"
        depth -= char == ">"
        if char == "(" and depth == 0:
            name = name[:i]
            break
    head, angle, tail = name.partition("<")
    return head.rsplit("::", 1)[-1] + angle + tail


def _demangle(symbols):
    out = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True, check=True).stdout
    return dict(zip(symbols, out.splitlines()))


def _nvcc_command(nvcc, source, workdir):
    import torch  # noqa: F401  (cpp_extension needs it imported)
    from torch.utils import cpp_extension

    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in ARCHS]
    includes = [f"-I{path}" for path in cpp_extension.include_paths()] + [f"-I{ROOT / 'csrc'}"]
    # --fatbin: the device code only (what ptxas reports does not depend on the host pass, the slow half)
    return [nvcc, "--fatbin", str(source), "-o", str(workdir / "kernels.fatbin"), "--resource-usage", "-keep", f"-keep-dir={workdir}",
            *gencode, *cpp_extension.COMMON_NVCC_FLAGS, "-O3", "-lineinfo", "-std=c++20", "-Xcompiler", "-fPIC", *includes]


_ENTRY = re.compile(r"Compiling entry function '(?P<symbol>[^']+)' for 'sm_(?P<arch>\d+)'")
_FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")
_USED = re.compile(r"Used (?P<registers>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")
_PTX_ENTRY = re.compile(r"\.entry\s+(?P<symbol>[\w$]+)\s*\((?P<body>.*?)\{", re.S)
_MAXNTID = re.compile(r"\.maxntid\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?")  # PTX 9 writes ".maxntid 512"


def _launch_bounds(workdir):
    bounds = {}
    for ptx in workdir.glob("*.ptx"):
        arch = re.search(r"compute_(\d+)|sm_(\d+)", ptx.name)
        for match in _PTX_ENTRY.finditer(ptx.read_text()):
            ntid = _MAXNTID.search(match["body"])
            threads = int(ntid[1]) * int(ntid[2] or 1) * int(ntid[3] or 1) if ntid else HARDWARE_MAX_THREADS
            bounds[(arch and (arch[1] or arch[2]), match["symbol"])] = threads
    return bounds


def audit_source(nvcc, source):
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        result = subprocess.run(_nvcc_command(nvcc, source, workdir), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name}:\n{result.stderr[-4000:]}")
        bounds = _launch_bounds(workdir)
    raw = []
    current = None
    for line in result.stderr.splitlines():
        if entry := _ENTRY.search(line):
            current = {"symbol": entry["symbol"], "arch": entry["arch"], "smem": 0}
            raw.append(current)
        elif current is not None and (frame := _FRAME.search(line)):
            current.update(stack=int(frame["stack"]), stores=int(frame["stores"]), loads=int(frame["loads"]))
        elif current is not None and (used := _USED.search(line)):
            current["registers"] = int(used["registers"])
            if smem := _SMEM.search(line):
                current["smem"] = int(smem["smem"])
    names = _demangle(sorted({r["symbol"] for r in raw}))
    records = []
    for r in raw:
        threads = bounds.get((r["arch"], r["symbol"]), bounds.get((None, r["symbol"])))
        if threads is None:  # the PTX of one architecture names the entry
            threads = next((t for (_, symbol), t in bounds.items() if symbol == r["symbol"]), HARDWARE_MAX_THREADS)
        records.append(KernelResources(f"sm_{r['arch']}", kernel_name(names[r["symbol"]]), r["registers"], threads,
                                       r["stack"], r["stores"], r["loads"], r["smem"]))
    return records


def audit(nvcc=None):
    """KernelResources of every kernel instantiation in csrc/cuda/*.cu, for each audited architecture."""
    nvcc = nvcc or find_nvcc()
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        per_source = list(pool.map(lambda source: audit_source(nvcc, source), sources))
    return sorted((r for records in per_source for r in records), key=lambda r: (r.arch, r.kernel))


def render(records, nvcc_version):
    lines = [
        "# CUDA kernels: compiled resources",
        "",
        "What ptxas reports for every kernel instantiation of `csrc/cuda/*.cu`, compiled as setup.py compiles",
        f"them (-O3, `TORCH_CUDA_ARCH_LIST` {ARCH_LIST}: a cubin for each of {', '.join('sm_' + a for a in ARCHS)}), "
        f"with {nvcc_version}. Max threads is the kernel's launch",
        "bound (`.maxntid` of its PTX); registers x max threads must fit the 65536-register file, and no",
        "kernel may spill on sm_80 or sm_90 (on sm_100 and sm_120, where Blackwell's ptxas needs a few more",
        "registers, 26 and 29 row kernels spill up to 1296 bytes; `tests/test_cuda_resources.py` bounds it until their",
        "launch bounds are tuned per architecture). Regenerate with `python tests/cuda_resources.py --write`; `tests/test_cuda_resources.py`",
        "fails when this table no longer matches the code, and `tests/test_cuda_emulated.py` checks every block",
        "size the host code launched under the emulator against it.",
        "",
        "| arch | kernel | registers | max threads | registers x threads | stack frame | spill stores | spill loads | static smem |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r.arch} | `{r.kernel}` | {r.registers} | {r.max_threads} | {r.register_demand} | {r.stack_frame} | "
                     f"{r.spill_stores} | {r.spill_loads} | {r.static_smem} |")
    return "\n".join(lines) + "\n"


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    release = re.search(r"release [\d.]+, V[\d.]+", out)
    return f"nvcc ({release[0]})" if release else "nvcc"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {TABLE.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        sys.exit("no nvcc found (set CUDA_HOME)")
    table = render(audit(nvcc), nvcc_version(nvcc))
    if args.write:
        TABLE.write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
