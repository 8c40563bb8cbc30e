"""Options several subcommands share, so they read the same everywhere."""

from __future__ import annotations

import click


def dual_option(name: str, **kwargs):
    """An option spelled both --like_olive and --like-this (the lab's commands use the first)."""
    return click.option(f"--{name}", f"--{name.replace('_', '-')}", name, **kwargs)


def model_option(help_text: str = "Model: a directory, a hub id, or the embedded 'tiny-phi3'."):
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
