"""The artifact-directory convention: steps chain by path, each output describing itself.

One module per job (ARCHITECTURE.md, "The artifact convention"):
- resolve.py: `-m SPEC` → a local model dir of a kind the step reads (embedded.py: the names
  that ship with phitune; gguf.py: a .gguf converted once; kinds.py: what a dir holds;
  payload.py: its files are whole);
- manifest.py: `phitune.json` and the key an output is filed under;
- output.py: atomic outputs (staged, swapped into place, leftovers recovered; up to date when
  the key matches).
The names below are those callers import from `phitune.artifacts`.
"""

from phitune.artifacts.embedded import (EMBEDDED_MODELS, EMBEDDED_NAMES, data_dir, embedded_path,
                                        heldout_text)
from phitune.artifacts.kinds import FINETUNE_ADAPTER, ResolvedModel, check_files_regular, hf_kind
from phitune.artifacts.manifest import (MANIFEST, changed_files, content_digest, make_key,
                                        read_manifest)
from phitune.artifacts.output import (Output, check_not_overlapping, check_parent_writable,
                                      probe_writable)
from phitune.artifacts.resolve import resolve_model

__all__ = ["EMBEDDED_MODELS", "EMBEDDED_NAMES", "FINETUNE_ADAPTER", "MANIFEST", "Output",
           "ResolvedModel", "changed_files", "check_files_regular", "check_not_overlapping",
           "check_parent_writable", "content_digest", "data_dir", "embedded_path", "hf_kind",
           "heldout_text", "make_key", "probe_writable", "read_manifest", "resolve_model"]
