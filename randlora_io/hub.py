"""Push adapters to and pull them from the Hugging Face Hub (``randlora-io push`` / ``pull``).

What goes up: one randlora file (or a dense delta), or a PEFT dir made by ``convert --to peft-randlora`` /
``peft-lora`` (so PEFT users can ``PeftModel.from_pretrained(repo)``), plus a model card unless one is there; all in
one commit. What comes down is checked twice before it is returned: every file against the size and git/LFS hash the
Hub lists for it, and the adapter against the spec (a corrupted cache entry is removed so a retry downloads again).

HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE are read when a call is made, not when this module is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import HubError, OutputExistsError, RandloraError, SourceFormatError
from .checkpoint.atomic import atomic_directory

HUB_PREFIX = "hub:"
CARD_NAME = "README.md"
_TRUE = {"1", "on", "yes", "true"}


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    files: list[str]


# --------------------------------------------------------------------------------------------------------------------
# Settings read at call time
# --------------------------------------------------------------------------------------------------------------------

def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is None:
        return bool(constants.HF_HUB_OFFLINE)
    return env.strip().lower() in _TRUE


def _cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


@contextlib.contextmanager
def _quiet_unless_tty() -> Iterator[None]:
    """huggingface_hub's progress bars only on an interactive terminal (never in logs or before an error line)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not sys.stderr.isatty():
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def parse_hub_source(arg: str) -> tuple[str, str | None]:
    """``hub:ORG/NAME[@revision]`` → (repo id, revision or None)."""
    ref = arg[len(HUB_PREFIX):] if arg.startswith(HUB_PREFIX) else arg
    repo_id, _, revision = ref.partition("@")
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise HubError(f"{arg}: not a Hub reference; write hub:ORG/NAME or hub:ORG/NAME@REVISION")
    return repo_id, (revision or None)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, action: str) -> Iterator[None]:
    """Turn huggingface_hub / network errors into one :class:`HubError` line saying what to do."""
    from huggingface_hub import errors as hf

    where = f"hub:{repo_id}" + (f"@{revision}" if revision else "")
    endpoint = hub_endpoint()
    try:
        yield
    except RandloraError:
        raise
    except hf.RevisionNotFoundError:
        raise HubError(f"{where}: revision {revision!r} not found at {endpoint}; check the branch, tag or commit")
    except hf.RepositoryNotFoundError:
        raise HubError(f"{where}: repository not found at {endpoint} (a private repo needs a token that can read "
                       "it: set HF_TOKEN or pass --token)")
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubError(f"{where}: {action} refused, the token was rejected by {endpoint} (HTTP {status}); "
                           "set HF_TOKEN or pass --token with write access")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"{where}: {action} failed at {endpoint}: {first}")
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled):
        raise HubError(f"{where}: not in the local cache and the Hub cannot be used (HF_HUB_OFFLINE=1 or no "
                       f"connection to {endpoint}); pull it once while online")
    except OSError as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if "consistency check failed" in text.lower():
            raise HubError(f"{where}: the download was corrupted ({text[:160]}); pull again")
        raise HubError(f"{where}: {action} failed: {text[:200]}")
    except Exception as exc:  # httpx transport errors are not OSErrors
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise HubError(f"{where}: cannot reach {endpoint} ({type(exc).__name__}); check HF_ENDPOINT and the "
                           "network, or set HF_HUB_OFFLINE=1 to use the cache")
        raise


# --------------------------------------------------------------------------------------------------------------------
# What to upload, and the model card
# --------------------------------------------------------------------------------------------------------------------

def upload_files(path: str | os.PathLike) -> dict[str, Path]:
    """``{path in repo: local file}`` for an adapter file or a PEFT dir (its top-level, non-hidden files)."""
    path = Path(path)
    if path.is_file():
        return {path.name: path}
    files = {p.name: p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")}
    if not files:
        raise SourceFormatError(f"{path}: an empty directory is not an adapter")
    return files


def model_card(path: str | os.PathLike, repo_id: str) -> str:
    """README.md for ``path``: YAML metadata (library_name, base_model, tags), the header summary, how to merge."""
    from .inspect import describe

    info = describe(path)
    kind = info["kind"]
    base = None
    if isinstance(info.get("base_model"), dict):
        base = info["base_model"].get("id")
    if base is None and kind.startswith("peft-"):
        from .sources.peft_dir import read_peft_config

        name = read_peft_config(path).get("base_model_name_or_path")
        base = name if isinstance(name, str) and name and not Path(name).is_absolute() else None
    method = "vera" if info.get("method") == "vera" else "randlora" if "randlora" in kind else kind.replace("peft-", "")
    tags = ["randlora-io", method]
    if kind.startswith("peft-"):
        tags.append("peft")
    yaml = ["---", "library_name: randlora-io"]
    if base:
        yaml.append(f"base_model: {base}")
    yaml += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    rows = [("kind", kind), ("generator", info.get("generator")), ("bases", info.get("kind_of_bases")),
            ("seed", info.get("seed")), ("rank r", info.get("rank")), ("alpha", info.get("alpha")),
            ("layers", len(info["layers"])), ("trainable parameters", info["trainable_params"]),
            ("size on disk", f"{info['file_bytes']:,} bytes")]
    table = ["| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    source = f"hub:{repo_id}"
    how = ["## How to use", "", "```bash", "pip install randlora-io",
           f"randlora-io pull {repo_id} -o adapter",
           f"randlora-io merge BASE_MODEL_DIR {source} -o merged", "```", ""]
    if kind.startswith("peft-"):
        how += ["This folder is also a PEFT adapter:", "", "```python", "from peft import PeftModel",
                f"model = PeftModel.from_pretrained(base_model, \"{repo_id}\")", "```", ""]
    title = f"# {repo_id.split('/')[-1]}"
    text = (f"A {'VeRA' if method == 'vera' else 'RandLoRA'} adapter in the randlora format: a seed, a rank and the "
            f"trained {'vectors' if method == 'vera' else 'scales'}; the random bases are regenerated bit-exactly from "
            "the seed (see the randlora-io SPEC)." if kind == "randlora" else f"An adapter ({kind}) pushed with randlora-io.")
    return "\n".join(yaml + [title, "", text, ""] + table + [""] + how)


def push_to_hub(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Validate ``path`` (a randlora file, dense delta or PEFT dir), create ``repo_id`` if needed (and the branch
    ``revision``), and upload the adapter and a model card in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from .inspect import validate

    path = Path(path)
    if not path.exists():
        raise SourceFormatError(f"{path}: no such file or directory")
    validate(path)
    files = upload_files(path)
    card = None if CARD_NAME in files else model_card(path, repo_id).encode()
    api = HfApi(endpoint=hub_endpoint(), token=token)
    branch = revision or "main"
    with _hub_errors(repo_id, revision, "push"), _quiet_unless_tty():
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(url, "repo_id", None) or repo_id
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(local))
                      for name, local in files.items()]
        if card is not None:
            operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card))
        info = api.create_commit(repo_id, operations, commit_message=commit_message or f"Upload {path.name}",
                                 revision=branch)
    names = [op.path_in_repo for op in operations]
    return PushResult(repo_id=repo_id, revision=branch, commit_url=str(info.commit_url), files=names)


# --------------------------------------------------------------------------------------------------------------------
# Download, verify, locate the adapter
# --------------------------------------------------------------------------------------------------------------------

def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    return _file_digest(path, digest)


def _file_digest(path: Path, digest) -> str:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _drop_cached(path: Path) -> None:
    """Remove a snapshot entry and the blob it points to, so the next pull downloads it again."""
    target = path.resolve()
    for p in (path, target):
        with contextlib.suppress(OSError):
            p.unlink()


def _verify_snapshot(api, repo_id: str, commit: str, snapshot: Path, where: str) -> None:
    """Every file of the snapshot has the size and git/LFS hash the Hub lists for it at ``commit``."""
    from huggingface_hub.hf_api import RepoFile

    listed = {f.path: f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
              if isinstance(f, RepoFile)}
    for name, entry in listed.items():
        local = snapshot / name
        if not local.exists():
            raise HubError(f"{where}: {name} is listed by the Hub but was not downloaded; pull again")
        if entry.lfs is not None:
            expected, actual = entry.lfs.sha256, _file_digest(local, hashlib.sha256())
        else:
            expected, actual = entry.blob_id, _git_blob_sha1(local)
        if local.stat().st_size != entry.size or (expected and expected != actual):
            _drop_cached(local)
            raise HubError(f"{where}: {name} is corrupted (its size or hash differs from the Hub's); "
                           "the cached copy was removed, pull again")


def find_adapter(folder: str | os.PathLike) -> Path:
    """The adapter in a downloaded repo: the folder itself when it is a PEFT dir, else its one adapter file."""
    from .sources.registry import detect_kind

    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return folder
    found = []
    for p in sorted(folder.glob("*.safetensors")):
        try:
            detect_kind(p)  # a damaged adapter raises here, naming what is wrong
        except SourceFormatError:
            continue  # a well-formed safetensors file that is not an adapter
        found.append(p)
    if len(found) != 1:
        what = "no adapter file" if not found else f"{len(found)} adapter files ({', '.join(p.name for p in found)})"
        raise SourceFormatError(f"{folder}: {what}; a repo must hold one randlora file or one PEFT adapter")
    return found[0]


def load_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Download ``repo_id`` (cache first; HF_HUB_OFFLINE=1 uses the cache only), verify every file against the Hub's
    hashes and the adapter against the spec, and return the adapter's path (a file, or a PEFT dir).

    With ``output_dir`` the verified files are copied there (atomically; an existing dir needs ``overwrite``)."""
    from huggingface_hub import HfApi, snapshot_download

    from .inspect import validate

    where = f"hub:{repo_id}" + (f"@{revision}" if revision else "")
    if output_dir is not None and Path(output_dir).exists() and not overwrite:
        raise OutputExistsError(f"{output_dir}: output exists; pass --overwrite to replace it")
    offline = hub_offline()
    endpoint = hub_endpoint()
    with _hub_errors(repo_id, revision, "pull"), _quiet_unless_tty():
        snapshot = Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=_cache_dir(cache_dir),
                                          endpoint=endpoint, local_files_only=offline))
        if not offline:
            _verify_snapshot(HfApi(endpoint=endpoint, token=token), repo_id, snapshot.name, snapshot, where)
    try:
        adapter = find_adapter(snapshot)
        validate(adapter)
    except RandloraError as exc:
        raise HubError(f"{where}: the downloaded adapter is not valid: {exc}") from exc
    if output_dir is None:
        return adapter
    output_dir = Path(output_dir)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        for item in snapshot.iterdir():
            if item.is_file():
                shutil.copyfile(item, tmp / item.name)  # follows the cache's symlinks
    return output_dir if adapter == snapshot else output_dir / adapter.name


def resolve_adapter_arg(arg: str | os.PathLike) -> str:
    """A local path stays as is; ``hub:REPO_ID[@revision]`` is pulled (cache first), verified, and its path returned."""
    text = os.fspath(arg)
    if not text.startswith(HUB_PREFIX):
        return text
    repo_id, revision = parse_hub_source(text)
    return str(load_from_hub(repo_id, revision=revision))


__all__ = ["HUB_PREFIX", "PushResult", "find_adapter", "load_from_hub", "model_card", "parse_hub_source",
           "push_to_hub", "resolve_adapter_arg"]
