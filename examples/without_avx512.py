"""Run a ``peft-lisa`` command or an example script as on a CPU without AVX-512, on an x86 CPU that has it.

torch's own kernels are held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``,
``MKL_ENABLE_INSTRUCTIONS=AVX2``) and LiSA's CPU kernel is built without AVX-512 (``-mno-avx512f``: its portable
vector code on 32-byte vectors), as an AVX2-only CPU (AMD Zen 2/3, Intel before Skylake-SP) runs them.
``--narrow`` (the first argument) goes further: torch's baseline kernels and a kernel without AVX (``-mno-avx``:
16-byte vectors, as SSE-only x86 and ARM NEON builds have). This is an approximation, and says so where it prints:
the caches, memory and clock stay this machine's, and libraries that read the CPU's features themselves may still use
AVX-512.

    python examples/without_avx512.py bench --threads 2 --contexts 2048 --batch-sizes 1,8
    python examples/without_avx512.py examples/attention_core.py --threads 2
    python examples/without_avx512.py --narrow examples/attention_core.py --threads 2 --decode --batch 8
"""

from __future__ import annotations

import os
import runpy
import sys

TORCH_LIMITS = {  # what each mode asks of torch, MKL and oneDNN (read when they load: set before torch is imported)
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "narrow": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
KERNEL_BUILDS = {"avx2": "portable", "narrow": "narrow"}  # each mode's build (cpu_kernel.NARROWER_BUILDS)


def main() -> None:
    argv = sys.argv[1:]
    mode = "narrow" if argv[:1] == ["--narrow"] else "avx2"
    argv = argv[1:] if mode == "narrow" else argv
    if not argv:
        sys.exit(__doc__)
    limits = TORCH_LIMITS[mode]
    if any(os.environ.get(name) != value for name, value in limits.items()):  # torch reads them once: start afresh
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **limits})

    import torch

    from peft_lisa.tuner import cpu_kernel

    if cpu_kernel.cpu_kernel_setting() != "off":  # the build this process loads, replaced by a narrower one
        cpu_kernel.build_narrower(KERNEL_BUILDS[mode], install=True)
    build = cpu_kernel.load_cpu_kernel()  # what the command will attend through
    kernel = "off" if build is None else f"{build.vector_instructions()} with {build.vector_bytes()}-byte vectors"
    print(
        f"as on a CPU without AVX-512 ({mode}, approximated on this one): torch kernels "
        f"{torch.backends.cpu.get_cpu_capability()}, LiSA kernel {kernel}",
        file=sys.stderr,
    )
    if argv[0].endswith(".py"):
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as python SCRIPT puts the script's folder
        runpy.run_path(argv[0], run_name="__main__")
    else:
        from peft_lisa.cli import main as cli

        sys.exit(cli(argv))


if __name__ == "__main__":
    main()
