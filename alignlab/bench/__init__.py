"""Unit-level benchmarking: honest time, peak memory and roofline ratios.

>>> from alignlab.bench import measure, compare
>>> m = measure(torch.matmul, a, b)                       # doctest: +SKIP
>>> cmp = compare({"ours": f, "peer": g}, x, bytes_moved=2 * x.nbytes)  # doctest: +SKIP
>>> print(cmp.table()); cmp.save_json("benchmarks/results/x.json")      # doctest: +SKIP

See ``docs/benchmarking.md``.
"""

from alignlab.bench.comparison import Comparison, compare, save_results, write_json
from alignlab.bench.roofline import copy_bandwidth, matmul_tflops
from alignlab.bench.timing import Measurement, format_bytes, library_versions, measure

__all__ = [
    "Comparison",
    "Measurement",
    "compare",
    "copy_bandwidth",
    "format_bytes",
    "library_versions",
    "matmul_tflops",
    "measure",
    "save_results",
    "write_json",
]
