"""`phitune auto-opt`'s and `phitune export-adapter`'s options, declared once (see
phitune/options.py), apart from the steps so that `--help` imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from phitune import options as O


PROVIDERS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "gpu"}


BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass
class AutoOptOptions:
    model: str = O.model("Model: a float or AWQ checkpoint, a .gguf file, an embedded model "
                         "('tiny-phi3', 'smollm2-135m-instruct'), or a finetune output (D or "
                         "D/model).")
    output: str = O.output()
    adapter_path: str | None = O.option(
        None, "PEFT LoRA adapter to convert into model/adapter_weights.onnx_adapter (default: the "
        "adapter/ beside a finetune output's model/).", metavar="DIR", type=str)
    device: str = O.option("cpu", "Target device of the ONNX model.", choices=("cpu", "gpu"))
    provider: str | None = O.option(None, "Execution provider; must agree with --device "
                                    "(default: the device's).", choices=tuple(PROVIDERS))
    precision: str = O.option(
        "int4", "int4: MatMulNBits (an AWQ input keeps its weights; a float input is rounded to "
        "nearest); fp32/fp16: float weights (an AWQ input dequantized).",
        choices=("int4", "fp16", "fp32"))
    block_size: int | None = O.option(  # None: fits the model (see _block_size)
        None, "int4 block size of the LM head and of a float input's layers (rounded to "
        "nearest; 128 decodes faster on CPU, 32 stays closer to float). An AWQ input's "
        "layers keep their group size. Default: an AWQ input's group size; for a float input 32, "
        "or 16 where 32 does not divide the model's widths.", type=int, among=BLOCK_SIZES)
    accuracy_level: int | None = O.option(
        None, "MatMulNBits compute: 4 = int8 (CPU default), 3 = bf16, 2 = fp16, 1 = fp32.",
        type=int, among=(0, 1, 2, 3, 4))
    multi_lora: bool = O.option(True, "Give every projection optional LoRA inputs so any adapter "
                                "loads at run time.", negatable=True)
    use_ort_genai: bool = O.option(False, "Accepted for the lab's command line: the output is "
                                   "always an onnxruntime-genai model dir.", flag=True)
    force: bool = O.force()

    @property
    def target(self) -> str:
        """The build target: the device the ONNX model is built to run on. `--device` is the
        lab's name for it, and the field keeps that name (it is a param of every key)."""
        return self.device


@dataclass
class ExportAdapterOptions:
    adapter: str = O.required("PEFT LoRA adapter dir (e.g. a finetune output's adapter/).",
                              short="-a", metavar="DIR")
    base: str = O.required("The auto-opt output (D or D/model) the adapter will run on.",
                           metavar="DIR")
    output: str = O.required("The .onnx_adapter file to write.", short="-o", metavar="FILE")
    force: bool = O.option(False, "Overwrite an existing file.", flag=True)
