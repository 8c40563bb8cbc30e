"""`phitune quantize`'s options, declared once (see phitune/options.py).

Apart from the step so that `phitune quantize --help` reads them without importing what the
step needs to run (artifacts, models, measurements).
"""

from __future__ import annotations

from dataclasses import dataclass

from phitune import options as O
from phitune.quantize import algorithms


@dataclass
class QuantizeOptions:
    model: str = O.model()
    output: str = O.output()
    algorithm: str = O.option("awq", algorithms.help_text(), choices=tuple(algorithms.ALGORITHMS))
    bits: int = O.option(4, "Weight bits (4).", among=(4,))
    group_size: int | None = O.option(  # None: the largest of GROUP_SIZES that fits the model
        None, "Input channels per quantization group: 32, 64 or 128 (default: 128 if it divides "
        "every quantized width of the model, else 64, else 32).", type=int, among=(32, 64, 128))
    zero_point: bool = O.option(True, "Asymmetric groups with a zero point.", negatable=True)
    calib_data: str | None = O.option(None, "Calibration text (.txt or .jsonl with 'text'); "
                                      "default: the shipped text.", metavar="FILE")
    calib_samples: int = O.option(64, "Calibration blocks.", min=1)
    calib_seq_len: int = O.option(256, "Tokens per calibration block (keep within the context "
                                  "the model was trained on).", min=8)
    device: str = O.device()
    dtype: str = O.dtype("Calibration compute dtype; auto: fp32 for small models; from 64M "
                         "parameters bf16 on CPUs with native bf16 matmul; else fp32 below 1B "
                         "parameters and a half type above.")
    compile: bool | None = O.compile("the AWQ search's fake-quantization and clip-error "
                                     "kernels: same results, seconds of compiling first", "1B")
    eval: bool | None = O.option(None, "Measure held-out perplexity before/after (default: on "
                                 "below 1B parameters).", negatable=True, dest="eval_")
    eval_data: str | None = O.option(None, "Held-out text for --eval; default: the shipped "
                                     "held-out text.", metavar="FILE")
    force: bool = O.force()
