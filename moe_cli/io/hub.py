"""The Hugging Face Hub as a home for moe-cli checkpoints: `moe push` uploads a checkpoint folder with a
generated model card, and `hf-hub:org/name` loads such a repository back (through the local cache offline).

A pushed repository holds ``model.safetensors`` (the checkpoint, metadata included), ``config.json``
(``{"library_name": "moe-cli", ...}`` so loaders can tell it from a plain timm repository), ``README.md`` (the
model card: YAML metadata for the Hub, then the MoE layout, how it was made, eval results) and, when the run
folder has them, ``summary.json`` and the routing figure ``expert_load.png``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import socket
import threading
import urllib.parse
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from moe_cli.errors import ConfigError, ModelSourceError
from moe_cli.io.card import LIBRARY, hub_config, model_card
from moe_cli.io.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    is_moe_checkpoint,
    load_checkpoint,
    shard_files,
    weights_path,
)
from moe_cli.runtime import atomic_write

DOWNLOAD_ERRORS = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError)
FIGURE = "expert_load.png"


def is_repo_id(text: str) -> bool:
    """A Hub repository id the Hub accepts, in the form ORG/NAME (huggingface_hub's own validator: letters, digits,
    `-`, `_`, `.`; no `--` or `..`; at most 96 characters)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(text, str) or text.count("/") != 1 or not all(text.split("/")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_repo_id(text: str, what: str = "the repository") -> str:
    """``text`` if it is a repository id the Hub accepts, else one line saying what is wrong with it."""
    if is_repo_id(text):
        return text
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    why = "it must be ORG/NAME"
    if isinstance(text, str) and text.count("/") == 1 and all(text.split("/")):
        try:
            validate_repo_id(text)
        except HFValidationError as e:
            why = str(e).split(". ")[0].strip().rstrip(".")
    raise ConfigError(f"{what} {text!r} is not a Hub repository id: {why} (letters, digits, '-', '_', '.'; "
                      "no '--' or '..'; at most 96 characters)")


def is_moe_cli_repo(config: dict | None) -> bool:
    return isinstance(config, dict) and config.get("library_name") == LIBRARY


def stage(ckpt_dir: str | Path, repo_id: str, out: Path) -> list[Path]:
    """Write into ``out`` exactly the files `moe push` uploads for the checkpoint folder ``ckpt_dir`` (a moe-cli
    checkpoint, or a folder `moe export --format transformers` wrote: uploaded as it is)."""
    check_repo_id(repo_id)
    if native := _native_folder(ckpt_dir):
        return _stage_native(native, out, repo_id)
    weights = weights_path(ckpt_dir)
    ckpt = load_checkpoint(weights)
    run = weights.parent.parent if weights.parent.name == "final" else None  # a run folder around final/
    results = json.loads((run / "summary.json").read_text()) if run and (run / "summary.json").is_file() else None
    figure = next((p for p in (weights.parent / FIGURE, *((run / "inspect" / FIGURE,) if run else ()))
                   if p.is_file()), None)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for file in [*shard_files(weights), *([weights] if weights.name == INDEX_NAME else [])]:
        shutil.copyfile(file, out / file.name)
        files.append(out / file.name)
    for name, text in (("config.json", json.dumps(hub_config(ckpt), indent=2)),
                       ("README.md", model_card(ckpt, repo_id, results, FIGURE if figure is not None else None))):
        atomic_write(out / name, lambda p, text=text: Path(p).write_text(text))
        files.append(out / name)
    if results is not None:
        shutil.copyfile(run / "summary.json", out / "summary.json")
        files.append(out / "summary.json")
    if figure is not None:
        shutil.copyfile(figure, out / FIGURE)
        files.append(out / FIGURE)
    return files


def _native_folder(path: str | Path) -> Path | None:
    """``path`` if it is a transformers model folder (config.json with a model_type, no moe-cli weights)."""
    p = Path(path)
    config = p / "config.json"
    if not p.is_dir() or not config.is_file() or is_moe_checkpoint(p):
        return None
    try:
        return p if isinstance(json.loads(config.read_text()).get("model_type"), str) else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def _stage_native(folder: Path, out: Path, repo_id: str) -> list[Path]:
    """A transformers folder's files, as they are (its README.md is the card `moe export` wrote)."""
    if not (folder / "README.md").is_file():
        raise ConfigError(f"{folder} is a transformers folder without a model card (README.md); export it with "
                          "`moe export CKPT --format transformers`, which writes one")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            shutil.copyfile(p, out / p.name)
            files.append(out / p.name)
    card = (out / "README.md").read_text()  # the export named the model by its folder: now by its repository
    (out / "README.md").write_text(card.replace(f"from_pretrained('{folder.name}')", f"from_pretrained('{repo_id}')")
                                   .replace(f"model_name: {folder.name}\n", f"model_name: {repo_id.split('/')[-1]}\n")
                                   .replace(f"\n# {folder.name}\n", f"\n# {repo_id.split('/')[-1]}\n", 1))
    return files


def push(ckpt_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create (or reuse) the Hub repository and upload the staged files; returns the repository URL."""
    import tempfile

    from huggingface_hub import HfApi, constants

    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise ModelSourceError("moe push needs the Hugging Face Hub, and HF_HUB_OFFLINE is set; unset it, or write "
                               "what would be uploaded with --dry-run DIR")
    if not hub_reachable():
        raise ModelSourceError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} (no answer within "
                               f"{HUB_PROBE_SECONDS:.0f} s); check the network, or write what would be uploaded with "
                               "--dry-run DIR")
    with tempfile.TemporaryDirectory() as tmp:
        stage(ckpt_dir, repo_id, Path(tmp))
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message="Upload moe-cli checkpoint")
        except (HfHubHTTPError, OSError) as e:  # refused token, no rights, the connection dropped
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelSourceError(f"could not push to {repo_id}: {reason}") from None
    return str(url)


HUB_PROBE_SECONDS = 3.0  # how long the Hub may take to accept a connection before we read the cache only


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within ``timeout`` (name lookup included; run in
    a thread, since a lookup without network can hang far longer than its caller's patience). Asked once per
    endpoint in a process: loading one hf-hub source touches the Hub several times."""
    from huggingface_hub import constants

    return _reachable(constants.ENDPOINT, timeout)


@functools.cache
def _reachable(endpoint: str, timeout: float) -> bool:
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


@contextlib.contextmanager
def quiet_hub():
    """Hub access that fails fast and in one line: huggingface_hub's per-retry warnings are hidden, and when the
    endpoint does not answer within a few seconds the Hub is read in offline mode (the local cache only) instead
    of retrying for a minute; a failed download then ends in one clear line of ours."""
    from huggingface_hub import constants

    logger = logging.getLogger("huggingface_hub")
    level, offline = logger.level, constants.HF_HUB_OFFLINE
    logger.setLevel(logging.ERROR)
    if not offline and not hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        logger.setLevel(level)
        constants.HF_HUB_OFFLINE = offline


def download_hint(what: str, err: Exception) -> ModelSourceError:
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        reason = "the Hub is unreachable or offline, and the files are not in the local cache"
    else:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = reason if len(reason) <= 160 else reason[:160].rsplit(" ", 1)[0] + " …"
    return ModelSourceError(
        f"could not fetch {what}: {reason}; for random weights use --no-pretrained (moe upcycle) or "
        "`model.pretrained: false` (recipes), or fill the Hugging Face cache (HF_HOME) on a machine with network and "
        "run with HF_HUB_OFFLINE=1")


def download(repo_id: str) -> Path:
    """The local path of a pushed checkpoint's ``model.safetensors``, or of its index with every shard beside it
    (from the cache when offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        with quiet_hub():
            try:
                return Path(hf_hub_download(repo_id, WEIGHTS_NAME))
            except EntryNotFoundError:  # sharded: the index, then the shards it names (one snapshot folder)
                index = Path(hf_hub_download(repo_id, INDEX_NAME))
                for file in shard_files(index):
                    hf_hub_download(repo_id, file.name)
                return index
    except DOWNLOAD_ERRORS as e:
        raise download_hint(f"`{repo_id}` from the Hugging Face Hub", e) from None
    except ValueError as e:
        raise ModelSourceError(f"`{repo_id}` is not a Hub id ({e})") from None
