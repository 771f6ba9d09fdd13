"""The CPU a run trains on and the kernels tunesmith chooses for it (docs/ARCHITECTURE.md, "CPU decisions").

`detect()` reads the model name, vendor and instruction-set flags (/proc/cpuinfo on Linux) into a
`FeatureSet`; `cpu_plan(features, dtype)` turns a feature set into a `CpuPlan`: each CPU path,
whether it is on, and the measurement behind that (bench/RESULTS.md, "CPU decisions per feature
set"). train/kernels.py and train/attention.py read their choices from `plan_in_use`, so a test
can hand them any feature set, or a plan, with `assume`.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from dataclasses import dataclass

# oneDNN builds (and keeps) a kernel for every distinct shape it sees, at about 0.7 MB each. It
# runs torch's bf16 products on the CPU, and our fp32 ones (train/kernels.py) where each dimension
# of a product is below, or a multiple of, ROW_MULTIPLE. With token counts padded to such multiples
# a run builds a bounded few kernels; unpadded, every new length builds more (bench/RESULTS.md).
ROW_MULTIPLE = 32

_VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}
# Display names of the features the plan reads, with the /proc/cpuinfo flags that make each one.
_FEATURES = {"AVX2": ("avx2",), "AVX-512": ("avx512f",), "AVX512-BF16": ("avx512_bf16",),
             "AMX": ("amx_bf16", "amx_tile")}


@dataclass(frozen=True)
class FeatureSet:
    """What the plan needs to know about a CPU; built by `detect()` or by hand."""

    model: str = ""
    vendor: str = ""  # "Intel", "AMD", or the raw vendor id of others
    flags: frozenset[str] = frozenset()  # /proc/cpuinfo flags, lower case
    torch_capability: str = ""  # torch.backends.cpu.get_cpu_capability(), e.g. "AVX512"

    def has(self, feature: str) -> bool:
        """Whether the CPU has a feature of `_FEATURES` (by its display name)."""
        return all(flag in self.flags for flag in _FEATURES[feature])

    @property
    def native_bf16(self) -> bool:
        """bf16 instructions in hardware; elsewhere torch emulates bf16, slowly."""
        return self.has("AVX512-BF16") or self.has("AMX")

    @property
    def fast_bf16_products(self) -> bool:
        """bf16 matrix products measured faster than fp32: on AMX, and with AVX512-BF16 on AMD
        (992 vs 498 GFLOP/s). An Intel Xeon with AVX512-BF16 but no AMX ran them at half the fp32
        rate (165 vs 318 GFLOP/s)."""
        return self.has("AMX") or (self.has("AVX512-BF16") and self.vendor == "AMD")

    def names(self) -> list[str]:
        return [name for name in _FEATURES if self.has(name)]

    def describe(self) -> str:
        """e.g. 'Intel(R) Xeon(R) Processor (Intel; AVX2 AVX-512 AVX512-BF16, no AMX)'."""
        missing = [name for name in ("AVX-512", "AMX") if not self.has(name)]
        features = " ".join(self.names()) or "no AVX2"
        if missing:
            features += ", no " + "/".join(missing)
        return f"{self.model or 'unknown CPU'} ({self.vendor or 'unknown vendor'}; {features})"


def parse_cpuinfo(text: str, torch_capability: str = "") -> FeatureSet:
    """The feature set of the first processor listed in a /proc/cpuinfo text (x86 `flags`, Arm
    `Features`)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    vendor = fields.get("vendor_id", "")
    flags = fields.get("flags") or fields.get("Features", "")
    return FeatureSet(model=fields.get("model name", ""), vendor=_VENDORS.get(vendor, vendor),
                      flags=frozenset(flags.lower().split()), torch_capability=torch_capability)


@functools.cache
def detect() -> FeatureSet:
    """This machine's CPU (once per process); without /proc/cpuinfo, the platform's processor
    name and no flags, so every vendor-specific path stays off."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            found = parse_cpuinfo(handle.read(), capability)
    except OSError:
        found = FeatureSet(torch_capability=capability)
    if not found.model:
        found = FeatureSet(platform.processor() or platform.machine(), found.vendor, found.flags, capability)
    return found


_ASSUMED: list[FeatureSet | CpuPlan] = []


def features() -> FeatureSet:
    """The feature set the kernels plan for: this machine's, unless `assume` says otherwise."""
    if not _ASSUMED:
        return detect()
    top = _ASSUMED[-1]
    return top if isinstance(top, FeatureSet) else top.features


@contextlib.contextmanager
def assume(assumed: FeatureSet | CpuPlan) -> Iterator[None]:
    """Plan the kernels for another CPU's feature set, or follow a given plan for runs in its dtype
    (tests, A/B benchmarks); this machine's plan again on exit."""
    _ASSUMED.append(assumed)
    try:
        yield
    finally:
        _ASSUMED.pop()


@dataclass(frozen=True)
class Choice:
    """One CPU path: whether it is on, what runs, and why."""

    on: bool
    value: str
    reason: str


@dataclass(frozen=True)
class CpuPlan:
    """The kernels a run on `features` in `dtype` ("fp32" or "bf16") uses."""

    features: FeatureSet
    dtype: str
    fp32_products: Choice  # fp32 matrix products on oneDNN (train/kernels.matmul_nt)
    training_forwards: Choice  # train/kernels.set_training_forwards
    padding: Choice  # token counts padded to ROW_MULTIPLE
    bf16_attention: Choice  # train/attention: "matmul", "sdpa" or "fp32"
    bf16: Choice  # whether bf16 autocast is advisable on this CPU
    head_product: Choice  # the fp32 output head's forward product on oneDNN (train/loss.py)

    @property
    def row_multiple(self) -> int | None:
        return ROW_MULTIPLE if self.padding.on else None

    def choices(self) -> dict[str, Choice]:
        named = {"fp32 products": self.fp32_products, "training forwards": self.training_forwards,
                 "padding": self.padding}
        if self.dtype == "fp32":
            named["head product"] = self.head_product
        if self.dtype == "bf16":
            named |= {"bf16 attention": self.bf16_attention, "bf16": self.bf16}
        return named

    def summary(self) -> str:
        """One line: the kernels this plan runs, e.g. 'fp32 products oneDNN, training forwards on, ...'."""
        return ", ".join(f"{name} {choice.value}" for name, choice in self.choices().items())


def cpu_plan(features: FeatureSet, dtype: str) -> CpuPlan:
    """The CPU paths for a run in `dtype` ("fp32" or "bf16") on `features`; a pure function."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', not {dtype!r}")
    products = _fp32_products(features)
    # torch runs bf16 products on oneDNN where the CPU has AVX-512 (its own dispatch); ours are
    # fp32 products where the plan puts them there.
    on_onednn = products.on if dtype == "fp32" else features.has("AVX-512")
    padding = Choice(True, str(ROW_MULTIPLE), "oneDNN keeps a kernel per product shape (0.7 MB each): padded "
                                              "token counts bound them") if on_onednn else \
        Choice(False, "none", "products not on oneDNN: no per-shape kernels to bound")
    return CpuPlan(features, dtype, products, _training_forwards(dtype), padding, _bf16_attention(features),
                   _bf16_advice(features), _head_product(features, products))


def _fp32_products(features: FeatureSet) -> Choice:
    if features.has("AVX-512") and features.vendor == "Intel" and not features.has("AMX"):
        # torch's x86 builds use MKL as their BLAS, whose AVX-512 kernels beat oneDNN's on this
        # Intel CPU (not on AMD's); the pieces then need no padding either.
        return Choice(False, "torch matmul", "torch's BLAS (MKL) 7-10% faster than oneDNN on an Intel Xeon with "
                                             "AVX-512 and no AMX: 234 vs 214 tokens/s (2 threads), 136 vs 124 and "
                                             "133 vs 124 (1 thread); measured on one such Xeon (with AVX512-FP16), "
                                             "applied to all")
    if features.has("AVX-512"):
        return Choice(True, "oneDNN", "oneDNN uses AVX-512 where torch's BLAS may not: 2.2x and 1.58x on two AMD "
                                      "EPYCs (the second a Zen 5), 1.13x on an Intel Xeon with AMX")
    if features.has("AVX2"):
        # Without AVX-512 oneDNN has no wider kernels than the BLAS, and MKL's AVX2 ones won.
        return Choice(False, "torch matmul", "AVX2 only: torch's BLAS (MKL) faster than oneDNN, 132.8 vs 112.3 "
                                             "tokens/s (2 threads), 89.2 vs 69.2 (1 thread); measured on an AMD "
                                             "EPYC (Zen 3), applied to all")
    return Choice(False, "torch matmul", "no AVX2/AVX-512: oneDNN's gain was measured only with AVX-512")


def _head_product(features: FeatureSet, products: Choice) -> Choice:
    if products.on:
        return Choice(True, "oneDNN", "with the other fp32 products")
    if features.has("AVX2") and not features.has("AVX-512"):
        # MKL splits the head's few-row, 49k-column product badly; oneDNN does not, and its row
        # counts are padded like every oneDNN product's, so few kernels are built.
        return Choice(True, "oneDNN", "AVX2 only: the head's 160 x 576 x 49152 product at 90 vs 49 GFLOP/s on "
                                      "torch's BLAS (2 threads; 137 vs 191 ms at 1), a step 0-6% faster in five "
                                      "alternated runs; measured on an AMD EPYC (Zen 3)")
    return Choice(False, "torch matmul", "with the other fp32 products")


def _training_forwards(dtype: str) -> Choice:
    if dtype == "fp32":
        return Choice(True, "on", "+7% tokens/s and 25% fewer saved activations (fp32, AMD EPYC)")
    return Choice(True, "on", "bf16 frozen norms in one autograd node: +4-8% a step (Zen 5); the other "
                              "forwards speed-neutral in bf16 (494 vs 500 tokens/s Intel AMX, 744 vs 762 AMD "
                              "EPYC), kept for the activations they save")


def _bf16_attention(features: FeatureSet) -> Choice:
    if features.has("AMX"):
        return Choice(True, "matmul", "bf16 products on the AMX tiles, softmax in fp32")
    if features.fast_bf16_products:
        return Choice(True, "matmul", "bf16 products +17% over the fp32 kernel (587 vs 500 tokens/s, AMD EPYC); "
                                      "in query blocks, 317 vs 285 tokens/s for the fp32 kernel (1 thread, Zen 5; "
                                      "283 vs 290 before)")
    if features.native_bf16:
        return Choice(True, "fp32", "bf16 products slower than fp32 here: fp32 kernel 48 ms, bf16 sdpa 84, "
                                    "matmul 88 (one layer, 4 samples, Intel Xeon without AMX)")
    return Choice(True, "fp32", "no native bf16: the fp32 kernel on cast-up q, k, v")


def _bf16_advice(features: FeatureSet) -> Choice:
    if features.fast_bf16_products:
        return Choice(True, "advisable", "bf16 products about 2x fp32 (992 vs 498 and 924 vs 451 GFLOP/s on two "
                                         "AMD EPYCs; 494 vs 296 tokens/s Intel AMX)")
    if features.native_bf16:
        return Choice(False, "slower than fp32", "AVX512-BF16 without AMX: bf16 products measured at half the "
                                                 "fp32 rate (165 vs 318 GFLOP/s, Intel Xeon)")
    return Choice(False, "unsupported", "no AVX512-BF16 or AMX: bf16 would be emulated")


@functools.lru_cache(maxsize=32)
def _cached_plan(features: FeatureSet, dtype: str) -> CpuPlan:
    return cpu_plan(features, dtype)


def plan_in_use(dtype: str) -> CpuPlan:
    """The plan the kernels follow in `dtype`: an assumed plan of that dtype, else the plan for
    `features()` (cached: the kernels ask at every layer call)."""
    top = _ASSUMED[-1] if _ASSUMED else None
    if isinstance(top, CpuPlan) and top.dtype == dtype:
        return top
    return _cached_plan(features(), dtype)
