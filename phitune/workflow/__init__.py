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
same steps first (`phitune.workflow.olive`). Modules, one job each:

    plan.py    load and validate a file, build each step's command line, keys, the plan
    olive.py   Olive config → phitune steps, with every key it cannot apply named
    run.py     execute a plan: run or skip each step, link the outputs, record them
    cache.py   list and prune a cache directory
"""

from phitune.workflow.plan import Step, Workflow, load_workflow, make_plan  # noqa: F401
