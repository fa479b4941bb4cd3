"""`kubellm fetch SOURCE --dest DIR`: put a loadable model folder at DIR.

The operator's download Job runs this before any engine starts, so a bad token,
a missing repository or a full volume shows up as one clear line in the Job's
log instead of a crash-looping GPU pod. Sources:

  hf://ORG/NAME   downloaded from the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN honoured): only
                  the top-level files an engine loads, resumable (a partial file continues with
                  an HTTP range, finished files are not fetched again), weights checked by sha256;
  file:///PATH    copied into DEST file by file (finished files are skipped on a rerun), or
                  verified in place (nothing written) when DEST is PATH;
  pvc://CLAIM/P   verified in place (nothing written): the Job mounts the claim, so DEST is the
                  folder itself.

A completed fetch leaves DEST/.kubellm-complete.json naming the source and revision; a
rerun for the same source and revision returns at once without touching the network.
Deliberately light: this module never imports torch (`python -m engine.fetch` runs in a slim image).
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = ".kubellm-complete.json"
# Top-level files an engine loads; sub-folders (e.g. original/ checkpoints) and *.bin/*.pt weights are skipped.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "merges.txt",
                       "vocab.txt", "spiece.model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILE_PATTERNS)


class FetchError(Exception):
    """A failure the user can act on; the message is the one line the CLI prints."""


# --- the command line -----------------------------------------------------------------


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="hf://ORG/NAME, file:///PATH or pvc://CLAIM/PATH")
    parser.add_argument("--revision", default="main",
                        help="Hub branch, tag or commit (hf:// only; default: main)")
    parser.add_argument("--dest", required=True, type=Path, help="folder to fill (or to verify, for pvc://)")


def run_fetch(args: argparse.Namespace) -> int:
    try:
        folder = fetch(args.source, args.revision, args.dest)
    except FetchError as error:
        print(f"kubellm fetch: error: {error}", file=sys.stderr)
        return 1
    print(f"kubellm fetch: {args.source} is ready at {folder}")
    return 0


# --- fetching -------------------------------------------------------------------------


def fetch(source: str, revision: str, dest: Path) -> Path:
    scheme, _, location = source.partition("://")
    dest = Path(dest)
    in_place = scheme == "pvc" or (scheme == "file" and dest.resolve() == Path(location).resolve())
    if in_place:  # someone else's folder, possibly read-only: checked, never written
        verify_model_folder(dest)
        return dest
    if is_complete(dest, source, revision):
        print(f"kubellm fetch: {dest} already holds {source}@{revision}")
        return dest
    if scheme == "hf":
        if location.count("/") != 1:
            raise FetchError(f"{source}: a hub source looks like hf://ORG/NAME")
        files, commit = download_from_hub(location, revision, dest)
    elif scheme == "file":
        files, commit = copy_folder(Path(location), dest), None
    else:
        raise FetchError(f"{source}: the source must start with hf://, file:// or pvc://")
    verify_model_folder(dest)
    write_marker(dest, {"source": source, "revision": revision, "commit": commit, "files": sorted(files)})
    return dest


def is_complete(dest: Path, source: str, revision: str) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("source"), marker.get("revision")) == (source, revision) and all(
        (dest / name).is_file() for name in marker.get("files", []))


def write_marker(dest: Path, content: dict) -> None:
    partial = partial_path(dest / MARKER)
    partial.write_text(json.dumps(content, indent=1))
    partial.replace(dest / MARKER)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_space(dest: Path, needed: int) -> None:
    free = free_bytes(dest)
    if needed > free:
        raise FetchError(f"not enough space in {dest}: the model needs {gib(needed)} more but only {gib(free)} is "
                         f"free; give the volume more room (spec.cache.size)")


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def no_space(error: OSError, dest: Path) -> FetchError:
    return FetchError(f"no space left on the device holding {dest} while writing {error.filename or 'a file'}; "
                      f"give the volume more room (spec.cache.size)")


# --- hf:// ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int
    sha256: str | None  # LFS files (the weights) carry their content hash


def wanted_hub_files(siblings) -> list[HubFile]:
    """The top-level files an engine needs, sorted by name."""
    return sorted((HubFile(file.rfilename, file.size or 0, file.lfs.sha256 if file.lfs else None)
                   for file in siblings
                   if "/" not in file.rfilename and is_model_file(file.rfilename)),
                  key=lambda file: file.name)


def download_from_hub(repo: str, revision: str, dest: Path) -> tuple[list[str], str]:
    """huggingface_hub resolves the revision, lists the files and maps errors; the transfer is ours
    because the library (2.x) discards partial files, and a model is tens of GB."""
    import httpx2  # huggingface_hub's HTTP client
    import huggingface_hub  # imported here: file:// and pvc:// need no hub client
    from huggingface_hub import errors

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: the library reads it once, at import
    token = os.environ.get("HF_TOKEN") or None
    try:
        info = huggingface_hub.HfApi(endpoint=endpoint, token=token).model_info(
            repo, revision=revision, files_metadata=True)
        files = wanted_hub_files(info.siblings or [])
        if not files:
            raise FetchError(f"hf://{repo}@{revision} has no model files (config.json, *.safetensors) at its top level")
        dest.mkdir(parents=True, exist_ok=True)
        todo = [file for file in files if existing_size(dest / file.name) != file.size]
        check_space(dest, sum(file.size - existing_size(partial_path(dest / file.name)) for file in todo))
        headers = huggingface_hub.utils.build_hf_headers(token=token)
        for index, file in enumerate(todo, start=1):
            print(f"kubellm fetch: [{index}/{len(todo)}] {file.name} ({gib(file.size)})", flush=True)
            url = huggingface_hub.hf_hub_url(repo, file.name, revision=info.sha, endpoint=endpoint)
            download_file(url, headers, dest / file.name, file)
    except errors.GatedRepoError as error:
        raise FetchError(f"hf://{repo} is gated: accept its terms on the Hub with the account of HF_TOKEN "
                         f"({status_of(error)})") from None
    except errors.RevisionNotFoundError:
        raise FetchError(f"hf://{repo} has no revision {revision!r} (404)") from None
    except errors.HfHubHTTPError as error:
        raise hub_error(repo, error) from None
    except httpx2.TransportError as error:
        raise FetchError(f"network error while fetching hf://{repo} ({type(error).__name__}: {error}); "
                         f"run the fetch again to resume") from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise no_space(error, dest) from None
        raise FetchError(f"cannot fetch hf://{repo}: {error}") from None
    return [file.name for file in files], info.sha


def partial_path(target: Path) -> Path:
    return target.with_name(f"{target.name}.partial")


def download_file(url: str, headers: dict, target: Path, file: HubFile) -> None:
    """Append to TARGET.partial from where it stopped (HTTP Range), check size and hash, then rename."""
    from huggingface_hub.utils import get_session, hf_raise_for_status
    from tqdm import tqdm

    partial = partial_path(target)
    offset = existing_size(partial)
    if offset > file.size:
        partial.unlink()
        offset = 0
    request_headers = {**headers, "Accept-Encoding": "identity"}
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    with get_session().stream("GET", url, headers=request_headers, follow_redirects=True,
                              timeout=60) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        if response.status_code != 206:
            offset = 0  # the server sent the whole file
        with open(partial, "ab" if offset else "wb") as out, tqdm(
                total=file.size, initial=offset, unit="B", unit_scale=True, desc=file.name, disable=None) as bar:
            for chunk in response.iter_bytes():  # as it arrives: a cut connection keeps what came
                out.write(chunk)
                bar.update(len(chunk))
    received = existing_size(partial)
    if received != file.size:
        raise FetchError(f"{file.name}: received {received} of {file.size} bytes; run the fetch again to resume")
    if file.sha256 and file_sha256(partial) != file.sha256:
        partial.unlink()
        raise FetchError(f"{file.name}: content does not match the Hub's sha256 (removed; run the fetch again)")
    partial.replace(target)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as reader:
        while block := reader.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def existing_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def status_of(error) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def hub_error(repo: str, error) -> FetchError:
    status = status_of(error)
    if status == 401:
        return FetchError(f"401 Unauthorized for hf://{repo}: the repository is private or gated (or does not exist) "
                          f"and HF_TOKEN is missing or invalid; set spec.model.hfTokenSecret to a token with access")
    if status == 404:
        return FetchError(f"404 Not Found: hf://{repo} does not exist on {os.environ.get('HF_ENDPOINT') or 'the Hub'}")
    if status == 403:
        return FetchError(f"403 Forbidden for hf://{repo}: the token cannot read this repository")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return FetchError(f"the Hub answered {status or 'an error'} for hf://{repo}: {first_line}")


# --- file:// --------------------------------------------------------------------------


def copy_folder(source: Path, dest: Path) -> list[str]:
    """Copy the model files; a rerun skips files already copied (same size and mtime)."""
    if not source.is_dir():
        raise FetchError(f"file://{source}: no such folder")
    names = sorted(path.name for path in source.iterdir() if path.is_file() and is_model_file(path.name))
    dest.mkdir(parents=True, exist_ok=True)
    todo = [name for name in names if not same_file(source / name, dest / name)]
    todo_bytes = sum((source / name).stat().st_size for name in todo)
    check_space(dest, todo_bytes)
    from tqdm import tqdm  # light, and only needed when there is something to copy

    with tqdm(total=todo_bytes, unit="B", unit_scale=True, desc="copying", disable=None) as progress:
        for name in todo:
            copy_file(source / name, dest / name, progress.update)
    return names


def same_file(source: Path, copy: Path) -> bool:
    if not copy.is_file():
        return False
    a, b = source.stat(), copy.stat()
    return a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime)


def copy_file(source: Path, target: Path, advance, chunk: int = 8 << 20) -> None:
    """Copy through a .partial file so an interrupted copy never looks finished."""
    partial = partial_path(target)
    try:
        with open(source, "rb") as reader, open(partial, "wb") as writer:
            while block := reader.read(chunk):
                writer.write(block)
                advance(len(block))
        shutil.copystat(source, partial)
        partial.replace(target)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise no_space(error, target.parent) from None
        raise FetchError(f"cannot copy {source} to {target}: {error.strerror or error}") from None


# --- verification ---------------------------------------------------------------------


def verify_model_folder(folder: Path) -> None:
    """The files an engine needs are present and the JSON ones parse; the message names what is missing."""
    if not folder.is_dir():
        raise FetchError(f"{folder}: no such folder")
    config = folder / "config.json"
    if not config.is_file():
        raise FetchError(f"{folder}: config.json is missing (not a Hugging Face model folder)")
    load_json(config)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(load_json(index).get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise FetchError(f"{folder}: weight shard {missing[0]} is missing ({len(missing)} of {len(shards)} missing)")
    elif not any(folder.glob("*.safetensors")):
        raise FetchError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are supported)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FetchError(f"{folder}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FetchError(f"{path}: not valid JSON ({error})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubellm fetch", description=__doc__.splitlines()[0])
    add_fetch_arguments(parser)
    return run_fetch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
