"""`phitune run --config`: the steps of one file, each cached by key, final outputs linked.

A workflow file (JSON or YAML) names its steps; each step is one of the step commands with the
same option names as the CLI, and takes an earlier step's output by name:

    output_dir: models/tiny            # the final outputs are linked here, by step name
    cache_dir: .phitune-cache          # every step's output: <cache_dir>/<type>-<key>
    steps:
      - name: quantize                 # `type` defaults to the name
        model: tiny-phi3
        algorithm: rtn
      - name: finetune
        model: "@quantize"             # an earlier step's output dir
        data_files: data/travel.jsonl
        text_template: "<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n{response}<|end|>"
        max_steps: 30
      - name: onnx
        type: auto-opt
        model: "@finetune"             # a finetune dir: its model/ and adapter/ come along
      - name: check
        type: eval                     # figures cached too; max_ppl checked on every run
        model: "@onnx"
        max_ppl: 1000

An Olive workflow file (`input_model`, `data_configs`, `passes`, `engine`) is translated into the
same steps first (`phitune.workflow.olive`). Modules, one stage of the path each:

    files.py         the file → a mapping (JSON/YAML, bounded aliases), or one line
    olive/           Olive config → phitune steps, with every key it cannot apply named
    steps.py         `steps:` → Step records: names, types, @refs, input paths
    step_options.py  a step's mapping → its options dataclass, through the CLI's option
                     fields (no command line built or parsed)
    keys.py          each step's entry key (options, refs' keys, input digests)
    plan.py          load and check a file, the output dirs, the plan (run or cached)
    run.py           execute a plan: run or skip each step, link the outputs, record them
    cache.py         list and prune a cache directory
"""

from phitune.workflow.plan import Workflow, load_workflow, make_plan  # noqa: F401
from phitune.workflow.steps import Step  # noqa: F401
