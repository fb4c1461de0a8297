"""What the emulated ARM64 CPU is: its features as the guest sees them, and a /proc/cpuinfo for it.

qemu-user passes the emulated CPU's features to the guest in the auxiliary vector (AT_HWCAP,
AT_HWCAP2), as Linux does, but leaves /proc/cpuinfo to the host: an x86 file, with no ARM
processor in it, on which cpuinfo (the CPU detection inside torch and XNNPACK) crashes. The
guest's /proc/cpuinfo is therefore written from the guest's own hardware capabilities, in
Linux's format, with the model's MIDR (implementer, part), because XNNPACK picks some kernels by
core (Cortex-A53/A55-tuned ones) and cpuinfo reads the core from there.

Runs on both sides: ``python3 emulated_cpu.py`` inside the guest prints its HWCAP words.
"""

from __future__ import annotations

import struct
import sys

AT_HWCAP, AT_HWCAP2 = 16, 26

# Linux's names for the HWCAP and HWCAP2 bits, in bit order (arch/arm64/kernel/cpuinfo.c).
HWCAP_NAMES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
               "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2_NAMES = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
                "svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 "
                "smef16f32 smeb16f32 smef32f32 smefa64 wfxt ebf16 sveebf16").split()

# MIDR_EL1 of qemu's CPU models (target/arm/cpu64.c); "max" is implementer 0, part 'Q'.
MIDR = {"max": 0x000F0510, "cortex-a53": 0x410FD034, "cortex-a57": 0x411FD070, "cortex-a72": 0x410FD083,
        "cortex-a76": 0x414FD0B1, "neoverse-n1": 0x414FD0C1, "a64fx": 0x461F0010}

# The kernel families XNNPACK's int8 x int4 matrix kernels come in, by the feature each needs.
KERNEL_FEATURES = ("asimddp", "i8mm", "sve", "sve2", "sme", "bf16", "fphp")


def guest_hwcaps() -> tuple[int, int]:
    """This process's AT_HWCAP and AT_HWCAP2 (inside the guest)."""
    with open("/proc/self/auxv", "rb") as auxv:
        vector = dict(struct.iter_unpack("<QQ", auxv.read()))
    return vector.get(AT_HWCAP, 0), vector.get(AT_HWCAP2, 0)


def feature_names(hwcap: int, hwcap2: int) -> list[str]:
    return ([name for bit, name in enumerate(HWCAP_NAMES) if hwcap >> bit & 1]
            + [name for bit, name in enumerate(HWCAP2_NAMES) if hwcap2 >> bit & 1])


def model_of(cpu: str) -> str:
    """The qemu model of a -cpu value: "max,sve=off" -> "max"."""
    return cpu.split(",")[0]


def proc_cpuinfo(cpu: str, hwcap: int, hwcap2: int, processors: int) -> str:
    midr = MIDR[model_of(cpu)]
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(feature_names(hwcap, hwcap2))}\n"
             f"CPU implementer\t: {midr >> 24:#04x}\nCPU architecture: 8\nCPU variant\t: {midr >> 20 & 0xF:#x}\n"
             f"CPU part\t: {midr >> 4 & 0xFFF:#05x}\nCPU revision\t: {midr & 0xF}\n\n")
    return "".join(f"processor\t: {index}\n{block}" for index in range(processors))


if __name__ == "__main__":
    print(*guest_hwcaps())
    sys.exit(0)
