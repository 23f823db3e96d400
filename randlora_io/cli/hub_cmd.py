"""``randlora-io push`` and ``pull``."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import handle_errors


@click.command("push")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", help="Branch to commit to (created if missing; default main).")
@click.option("--token", help="Hub token with write access (default: HF_TOKEN or the saved login).")
@click.option("-m", "--message", "message", help="Commit message.")
@handle_errors
def push_command(path, repo_id, private, revision, token, message):
    """Upload PATH (a randlora file, dense delta or PEFT dir) to REPO_ID with a model card."""
    from ..hub import push_to_hub

    result = push_to_hub(path, repo_id, private=private, revision=revision, token=token, commit_message=message)
    click.echo(f"{path}: pushed {', '.join(result.files)} to {result.repo_id}@{result.revision} ({result.commit_url})")


@click.command("pull")
@click.argument("repo_id")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Copy the verified files into this directory.")
@click.option("--revision", help="Branch, tag or commit (default main).")
@click.option("--token", help="Hub token (default: HF_TOKEN or the saved login).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@handle_errors
def pull_command(repo_id, out, revision, token, overwrite):
    """Download REPO_ID, verify it against the Hub's hashes and the spec, and print the adapter's path."""
    from ..hub import load_from_hub, parse_hub_source

    repo_id, at = parse_hub_source(repo_id)
    path = load_from_hub(repo_id, revision=revision or at, token=token, output_dir=out, overwrite=overwrite)
    click.echo(str(path))


COMMANDS = [push_command, pull_command]
