"""``dptrain sample``: generate text from a trained character model.

    dptrain sample --checkpoint runs/shakespeare --prompt "ROMEO:" --tokens 300 --temperature 0.8 --seed 1
"""

from __future__ import annotations

import click

from dptrain.app.sample import sample_text

from .options import CONTEXT, debug_option, reports_errors


@click.command("sample", context_settings=CONTEXT)
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(),
              help="A checkpoint of a model trained with data.name = \"text\" (a checkpoint folder, or a run folder).")
@click.option("--prompt", default="\n", show_default=True, help="The text to continue (its characters must be in the "
              "model's vocabulary).")
@click.option("--tokens", default=200, show_default=True, type=int, help="How many characters to generate.")
@click.option("--temperature", default=1.0, show_default=True, type=float,
              help="Divides the logits: below 1 more likely characters, above 1 more varied ones.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the draws: the same seed, the same text.")
@debug_option
@reports_errors
def sample_command(checkpoint_path, prompt, tokens, temperature, seed, debug=False):
    """Generate --tokens characters after --prompt with a character model; print prompt and text."""
    click.echo(sample_text(checkpoint_path, prompt, tokens, temperature, seed))
