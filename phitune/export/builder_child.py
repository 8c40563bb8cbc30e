"""onnxruntime-genai's model builder with attributes added to the config it builds from.

Run as `python -m phitune.export.builder_child SETTINGS.json <builder arguments>` in the
builder's subprocess (export/builder.py), for a family whose table record has a
`builder_config`. SETTINGS.json maps config attribute → value, resolved by the parent. They are
set on the config every builder model class receives (the base class's __init__, before it
reads anything), in this process only: nothing in site-packages changes, and the weights the
builder loads come from the checkpoint through transformers' own config, not this one.

Deliberately imports nothing from phitune: this runs in the builder's environment and
interpreter state, and only the builder's own imports belong there.
"""

from __future__ import annotations

import importlib
import json
import runpy
import sys
from pathlib import Path


def _set_on_every_config(settings: dict) -> None:
    importlib.import_module("onnxruntime_genai.models")  # puts the builder's `builders` on sys.path
    from builders import base  # the module builder.py imports its model classes from

    build = base.Model.__init__

    def init(self, config, *args, **kwargs):
        for name, value in settings.items():
            setattr(config, name, value)
        build(self, config, *args, **kwargs)

    base.Model.__init__ = init


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    _set_on_every_config(settings)
    sys.argv = [sys.argv[0], *sys.argv[2:]]  # the builder parses the rest as its own
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
