"""Options several subcommands share, so they read the same everywhere."""

from __future__ import annotations

import click


def dual_option(name: str, **kwargs):
    """An option spelled both --like_olive and --like-this (the lab's commands use the first)."""
    return click.option(f"--{name}", f"--{name.replace('_', '-')}", name, **kwargs)


def model_option(help_text: str = "Model: a directory, a .gguf file, a hub id, or an embedded "
                                   "model: 'tiny-phi3', 'smollm2-135m-instruct'."):
    return click.option("-m", "--model", "model", required=True, metavar="PATH|ID", help=help_text)


def output_option():
    return click.option("-o", "--output", "--output_path", "output", required=True,
                        type=click.Path(file_okay=True, dir_okay=True), metavar="DIR",
                        help="Output directory (written atomically).")


def force_option():
    return click.option("--force", is_flag=True,
                        help="Redo the step even if the output is up to date.")


def device_option():
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help="Where to compute; auto takes CUDA when present.")


def _stack(options):
    """One decorator applying `options` so they show in --help in the order listed."""
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


def record_options(data_files_help: str, train_on_prompt_help: str, max_seq_len_help: str | None = None):
    """The records a LoRA trains on (finetune) or is scored on (eval): read the same way by both."""
    return _stack([
        dual_option("data_files", multiple=True, metavar="FILE", help=data_files_help),
        dual_option("data_name", metavar="NAME",
                    help="json|csv|parquet, or a local dataset dir (save_to_disk)."),
        dual_option("text_template", metavar="TEMPLATE",
                    help=r"Text with {column} placeholders and \n escapes; loss on the part from "
                         "the last one."),
        dual_option("text_cols", metavar="A,B",
                    help="Columns the template uses (joined by newlines without one); with "
                         "--use_chat_template: the messages column, or PROMPT,RESPONSE "
                         "(SYSTEM,PROMPT,RESPONSE) columns."),
        dual_option("use_chat_template", is_flag=True,
                    help="Render records with the model's own chat template: a 'messages' "
                         "list, or prompt/response, instruction/output or question/answer "
                         "columns; loss on the assistant turns."),
        dual_option("train_on_prompt", is_flag=True, help=train_on_prompt_help),
        dual_option("max_seq_len", type=int, default=1024, show_default=True, help=max_seq_len_help),
        click.option("--overflow", type=click.Choice(["truncate", "drop"]), default="truncate",
                     show_default=True, help="What to do with records longer than --max_seq_len."),
    ])


def split_options(eval_split_help: str, eval_dataset_size_help: str, seed_help: str | None = None):
    """The held-out records: eval reproduces finetune's split from the same three values."""
    return _stack([
        dual_option("eval_split", type=float, help=eval_split_help),
        dual_option("eval_dataset_size", type=int, help=eval_dataset_size_help),
        click.option("--seed", type=int, default=42, show_default=True, help=seed_help),
    ])
